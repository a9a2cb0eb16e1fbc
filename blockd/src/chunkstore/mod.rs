//! The chunk store: a host's disks pooled into 4 MiB chunk slots.
//!
//! Each chunk (volume id, chunk index) lives in one slot of one disk. Data goes to the disk
//! through the io_uring [`Engine`] (O_DIRECT when the disk allows it); each 4 KiB block has a
//! crc32 that is checked on every read, and each chunk has a version bumped by every change,
//! which is what replication uses to find stale replicas.
//!
//! Space is thin: a fresh slot costs nothing on a sparse file; discarded blocks are punched
//! out (given back to the file system) and read as zeroes.
//!
//! Durability: slot records (bitmap, checksums, version) are cached in memory and written at
//! FLUSH/FUA, before the fdatasync, into alternating copies so a torn record never loses the
//! previous one. A slot is returned to the free list only once its free record is durable.
//! After an unclean stop the checksums of written blocks are re-derived from the data
//! (writes that were never flushed may have reached the data but not the record).

pub mod layout;
pub mod rangelock;
mod scrub;
pub use scrub::{RepairOutcome, ScrubReport};

use crate::buf::AlignedBuf;
use crate::export::ExportError;
use crate::replica::wire;
use crate::uring::{Buf, Engine};
use layout::{
    zero_block_crc, ChunkKey, Geometry, LayoutError, SlotRecord, Superblock, BLOCK,
    BLOCKS_PER_SLOT, COPY_SIZE, RECORD_SIZE, SLOT_SIZE,
};
use rangelock::RangeLock;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A disk to open: a file (created with `size` if missing) or a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub size: Option<u64>,
}

impl DiskConfig {
    /// Parses `PATH[:SIZE]` (`SIZE` like `10G`, `512M`, bytes without suffix).
    pub fn parse(s: &str) -> Result<DiskConfig, String> {
        match s.rsplit_once(':') {
            Some((p, sz)) if !p.is_empty() => Ok(DiskConfig {
                path: p.into(),
                size: Some(parse_size(sz).map_err(|e| format!("disk {s:?}: {e}"))?),
            }),
            _ if s.is_empty() => Err("empty disk path".into()),
            _ => Ok(DiskConfig {
                path: s.into(),
                size: None,
            }),
        }
    }
}

/// Parses `4096`, `64K`, `512M`, `10G`, `1T`, `1.5G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    if !v.is_finite() || v < 0.0 || v * mult as f64 > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}"));
    }
    Ok((v * mult as f64) as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("disk {path}: {source}")]
    Layout { path: PathBuf, source: LayoutError },
    #[error("disk {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("disk {path}: {msg}")]
    Config { path: PathBuf, msg: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct StoreMetrics {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub discard_ops: AtomicU64,
    pub flush_ops: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub io_errors: AtomicU64,
    pub nospace_errors: AtomicU64,
    pub restamped_blocks: AtomicU64,
    pub bad_records: AtomicU64,
}

/// Usage of one disk, as reported to volume-mgr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    pub path: String,
    pub capacity: u64,
    pub used: u64,
    pub slots: u64,
    pub free_slots: u64,
}

struct Disk {
    path: PathBuf,
    /// For data (O_DIRECT when `direct`).
    data: Arc<File>,
    /// Buffered: superblock, slot records, fdatasync.
    meta: Arc<File>,
    geo: Geometry,
    sb: Mutex<Superblock>,
    free: Mutex<Vec<u64>>,
    direct: bool,
}

struct Chunk {
    key: ChunkKey,
    disk: usize,
    slot: u64,
    rec: Mutex<SlotRecord>,
    dirty: AtomicBool,
    deleted: AtomicBool,
    locks: RangeLock,
    persist: tokio::sync::Mutex<()>,
}

pub struct ChunkStore {
    disks: Vec<Disk>,
    chunks: RwLock<HashMap<ChunkKey, Arc<Chunk>>>,
    dirty: Mutex<Vec<Arc<Chunk>>>,
    engine: Arc<Engine>,
    pub metrics: StoreMetrics,
    /// Chunks a read found a bad checksum in, waiting for the scrubber to repair them.
    suspects: Mutex<BTreeSet<ChunkKey>>,
    pub suspect_added: tokio::sync::Notify,
    /// Share of all slots (f64 bits) past which no new chunk is allocated (`--full-ratio`).
    full_ratio: AtomicU64,
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn open_disk(
    cfg: &DiskConfig,
    id: u64,
    metrics: &StoreMetrics,
) -> Result<(Disk, Vec<(u64, SlotRecord)>), StoreError> {
    let path = &cfg.path;
    let exists = path.exists();
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if !exists {
        if cfg.size.is_none() {
            return Err(StoreError::Config {
                path: path.clone(),
                msg: "does not exist; give a size (PATH:SIZE) to create it".into(),
            });
        }
        oo.create(true);
    }
    let meta = oo.open(path).map_err(io_err(path, "open"))?;
    let ft = meta.metadata().map_err(io_err(path, "stat"))?.file_type();
    let size = if ft.is_block_device() {
        crate::sys::block_device_size(&meta).map_err(io_err(path, "BLKGETSIZE64"))?
    } else if ft.is_file() {
        let len = meta.metadata().map_err(io_err(path, "stat"))?.len();
        match cfg.size {
            Some(want) if len == 0 => {
                meta.set_len(want).map_err(io_err(path, "set_len"))?;
                want
            }
            Some(want) if want != len => {
                tracing::warn!(path = %path.display(), configured = want, actual = len, "disk size differs from configuration; using the existing size");
                len
            }
            _ => len,
        }
    } else {
        return Err(StoreError::Config {
            path: path.clone(),
            msg: "not a regular file or block device".into(),
        });
    };
    let (data, direct) = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT not supported; using the page cache");
            (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io_err(path, "open"))?,
                false,
            )
        }
        Err(e) => return Err(io_err(path, "open O_DIRECT")(e)),
    };
    let mut sbuf = vec![0u8; layout::SUPERBLOCK_SIZE as usize];
    meta.read_exact_at(&mut sbuf, 0)
        .map_err(io_err(path, "read superblock"))?;
    let sb = match Superblock::decode(&sbuf) {
        Ok(sb) => sb,
        Err(LayoutError::BadMagic) if is_zero(&sbuf) => {
            let geo = Geometry::for_size(size).map_err(|source| StoreError::Layout {
                path: path.clone(),
                source,
            })?;
            // Blank the record area so no stale bytes look like records.
            let rec_len = geo.slots * RECORD_SIZE;
            if crate::sys::fallocate(&meta, crate::sys::ZERO_RANGE, geo.records_offset, rec_len)
                .is_err()
            {
                let zeros = vec![0u8; 1 << 20];
                let mut o = 0;
                while o < rec_len {
                    let n = (rec_len - o).min(zeros.len() as u64) as usize;
                    meta.write_all_at(&zeros[..n], geo.records_offset + o)
                        .map_err(io_err(path, "zero records"))?;
                    o += n as u64;
                }
            }
            let sb = Superblock {
                disk_id: id,
                cluster_id: String::new(),
                size,
                slots: geo.slots,
                clean: true,
            };
            meta.write_all_at(&sb.encode(), 0)
                .map_err(io_err(path, "write superblock"))?;
            meta.sync_data().map_err(io_err(path, "fdatasync"))?;
            tracing::info!(path = %path.display(), size, slots = geo.slots, "formatted new disk");
            sb
        }
        Err(source) => {
            return Err(StoreError::Config {
                path: path.clone(),
                msg: format!("not a fabric disk ({source}); refusing to overwrite it"),
            })
        }
    };
    let geo = Geometry::for_size(sb.size).map_err(|source| StoreError::Layout {
        path: path.clone(),
        source,
    })?;
    if geo.slots != sb.slots || sb.size > size {
        return Err(StoreError::Config {
            path: path.clone(),
            msg: format!(
                "superblock says {} bytes / {} slots, device has {} bytes",
                sb.size, sb.slots, size
            ),
        });
    }
    // Load slot records.
    let mut used = Vec::new();
    let mut free = Vec::new();
    let per_read = 1024u64;
    let mut buf = vec![0u8; (per_read * RECORD_SIZE) as usize];
    let mut s = 0;
    while s < geo.slots {
        let n = (geo.slots - s).min(per_read);
        let b = &mut buf[..(n * RECORD_SIZE) as usize];
        meta.read_exact_at(b, geo.record_offset(s))
            .map_err(io_err(path, "read records"))?;
        for i in 0..n {
            let r = &b[(i * RECORD_SIZE) as usize..((i + 1) * RECORD_SIZE) as usize];
            match SlotRecord::decode_slot(r) {
                Ok((_, Some(rec))) => used.push((s + i, rec)),
                Ok((gen, None)) => {
                    let _ = gen;
                    free.push(s + i)
                }
                Err(e) => {
                    // Neither copy is readable: the slot is quarantined (never reused, never
                    // served) so nothing is guessed.
                    metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %path.display(), slot = s + i, error = %e, "unreadable slot record; slot quarantined");
                }
            }
        }
        s += n;
    }
    free.reverse();
    let disk = Disk {
        path: path.clone(),
        data: Arc::new(data),
        meta: Arc::new(meta),
        geo,
        sb: Mutex::new(sb),
        free: Mutex::new(free),
        direct,
    };
    Ok((disk, used))
}

/// Re-derives the checksums of written blocks after an unclean stop.
fn restamp(disk: &Disk, slot: u64, rec: &mut SlotRecord) -> Result<u64, StoreError> {
    if rec.written_blocks() == 0 {
        return Ok(0);
    }
    let mut data = vec![0u8; SLOT_SIZE as usize];
    disk.meta
        .read_exact_at(&mut data, disk.geo.data_offset(slot))
        .map_err(io_err(&disk.path, "read for restamp"))?;
    let mut fixed = 0;
    for b in 0..layout::BLOCKS_PER_SLOT {
        if rec.is_written(b) {
            let c = crc32fast::hash(&data[b * BLOCK as usize..(b + 1) * BLOCK as usize]);
            if c != rec.crcs[b] {
                rec.crcs[b] = c;
                fixed += 1;
            }
        }
    }
    Ok(fixed)
}

impl ChunkStore {
    /// Opens (formatting blank ones) the given disks.
    pub fn open(disks: &[DiskConfig]) -> Result<ChunkStore, StoreError> {
        if disks.is_empty() {
            return Err(StoreError::Config {
                path: PathBuf::new(),
                msg: "no disks configured (--disk PATH[:SIZE])".into(),
            });
        }
        let engine = Engine::new(512).map_err(io_err(Path::new("io_uring"), "io_uring_setup"))?;
        let metrics = StoreMetrics::default();
        let mut opened = Vec::new();
        let mut chunks: HashMap<ChunkKey, Arc<Chunk>> = HashMap::new();
        let mut dirty = Vec::new();
        for (i, cfg) in disks.iter().enumerate() {
            let (disk, used) = open_disk(cfg, i as u64, &metrics)?;
            let clean = disk.sb.lock().unwrap().clean;
            for (slot, mut rec) in used {
                let mut is_dirty = false;
                if !clean {
                    let fixed = restamp(&disk, slot, &mut rec)?;
                    if fixed > 0 {
                        metrics.restamped_blocks.fetch_add(fixed, Ordering::Relaxed);
                        is_dirty = true;
                    }
                }
                let key = rec.key;
                if let Some(other) = chunks.get(&key) {
                    tracing::error!(
                        ?key,
                        slot,
                        other_slot = other.slot,
                        "chunk recorded twice; keeping the newer version, quarantining the other"
                    );
                    metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                    if other.rec.lock().unwrap().version >= rec.version {
                        continue;
                    }
                }
                let c = Arc::new(Chunk {
                    key,
                    disk: i,
                    slot,
                    rec: Mutex::new(rec),
                    dirty: AtomicBool::new(is_dirty),
                    deleted: AtomicBool::new(false),
                    locks: RangeLock::default(),
                    persist: tokio::sync::Mutex::new(()),
                });
                if is_dirty {
                    dirty.push(c.clone());
                }
                chunks.insert(key, c);
            }
            if !clean {
                tracing::warn!(path = %disk.path.display(), restamped = metrics.restamped_blocks.load(Ordering::Relaxed), "disk was not shut down cleanly; checksums re-derived");
            }
            {
                let mut sb = disk.sb.lock().unwrap();
                sb.clean = false;
                disk.meta
                    .write_all_at(&sb.encode(), 0)
                    .map_err(io_err(&disk.path, "write superblock"))?;
            }
            disk.meta
                .sync_data()
                .map_err(io_err(&disk.path, "fdatasync"))?;
            tracing::info!(path = %disk.path.display(), slots = disk.geo.slots, free = disk.free.lock().unwrap().len(), direct = disk.direct, "disk open");
            opened.push(disk);
        }
        Ok(ChunkStore {
            disks: opened,
            chunks: RwLock::new(chunks),
            dirty: Mutex::new(dirty),
            engine,
            metrics,
            suspects: Mutex::new(BTreeSet::new()),
            suspect_added: tokio::sync::Notify::new(),
            full_ratio: AtomicU64::new(1.0f64.to_bits()),
        })
    }

    /// The cluster id recorded on the disks ("" when never registered).
    pub fn cluster_id(&self) -> String {
        self.disks
            .iter()
            .map(|d| d.sb.lock().unwrap().cluster_id.clone())
            .find(|c| !c.is_empty())
            .unwrap_or_default()
    }

    /// Records the cluster id on every disk (durably).
    pub fn set_cluster_id(&self, id: &str) -> Result<(), StoreError> {
        for d in &self.disks {
            let mut sb = d.sb.lock().unwrap();
            sb.cluster_id = id.to_string();
            d.meta
                .write_all_at(&sb.encode(), 0)
                .map_err(io_err(&d.path, "write superblock"))?;
            d.meta.sync_data().map_err(io_err(&d.path, "fdatasync"))?;
        }
        Ok(())
    }

    pub fn stats(&self) -> Vec<DiskStats> {
        let mut used = vec![0u64; self.disks.len()];
        for c in self.chunks.read().unwrap().values() {
            used[c.disk] += c.rec.lock().unwrap().written_blocks() * BLOCK;
        }
        self.disks
            .iter()
            .zip(used)
            .map(|(d, used)| DiskStats {
                path: d.path.display().to_string(),
                capacity: d.geo.slots * SLOT_SIZE,
                used,
                slots: d.geo.slots,
                free_slots: d.free.lock().unwrap().len() as u64,
            })
            .collect()
    }

    /// Volume ids that have chunks here.
    pub fn volumes(&self) -> BTreeSet<u64> {
        self.chunks
            .read()
            .unwrap()
            .keys()
            .map(|k| k.volume)
            .collect()
    }

    /// The chunk indices stored here, by volume (one scan of the chunk map).
    pub fn chunk_indices(&self) -> std::collections::HashMap<u64, Vec<u64>> {
        let mut out: std::collections::HashMap<u64, Vec<u64>> = Default::default();
        for k in self.chunks.read().unwrap().keys() {
            out.entry(k.volume).or_default().push(k.index);
        }
        out
    }

    /// Version of a chunk (None when not stored here).
    pub fn chunk_version(&self, key: ChunkKey) -> Option<u64> {
        self.get(key).map(|c| c.rec.lock().unwrap().version)
    }

    /// `(chunk index, version)` of every chunk of a volume stored here, by index.
    pub fn chunk_versions(&self, volume: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .chunks
            .read()
            .unwrap()
            .values()
            .filter(|c| c.key.volume == volume)
            .map(|c| (c.key.index, c.rec.lock().unwrap().version))
            .collect();
        v.sort_unstable();
        v
    }

    /// Version and per-block crc32s of a chunk (`None` when not stored here).
    pub fn chunk_checksums(&self, key: ChunkKey) -> Option<(u64, Vec<u32>)> {
        self.get(key).map(|c| {
            let r = c.rec.lock().unwrap();
            (r.version, r.crcs.clone())
        })
    }

    /// Version and content digest (`replica::wire::digest_of`) of a chunk; `(0, empty)`
    /// when it is not stored here.
    pub fn chunk_state(&self, key: ChunkKey) -> (u64, u32) {
        match self.get(key) {
            Some(c) => {
                let r = c.rec.lock().unwrap();
                (r.version, wire::digest_of(|b| r.is_written(b), &r.crcs))
            }
            None => (0, wire::empty_digest()),
        }
    }

    /// States of the chunks of `volume` stored here with index >= `start`, by index, at most
    /// `max` of them; the second value is the index to continue from (`wire::END` if none).
    pub fn chunk_states(
        &self,
        volume: u64,
        start: u64,
        max: usize,
    ) -> (Vec<wire::ChunkState>, u64) {
        let mut cs: Vec<Arc<Chunk>> = self
            .chunks
            .read()
            .unwrap()
            .values()
            .filter(|c| c.key.volume == volume && c.key.index >= start)
            .cloned()
            .collect();
        cs.sort_unstable_by_key(|c| c.key.index);
        let next = cs.get(max).map(|c| c.key.index).unwrap_or(wire::END);
        let out = cs
            .iter()
            .take(max)
            .map(|c| {
                let r = c.rec.lock().unwrap();
                wire::ChunkState {
                    index: c.key.index,
                    version: r.version,
                    digest: wire::digest_of(|b| r.is_written(b), &r.crcs),
                }
            })
            .collect();
        (out, next)
    }

    /// A whole chunk as an image for a resync: `(version, written-block bitmap, the data of
    /// the written blocks in order)`. Every block is checked against its checksum; a bad one
    /// fails the fetch (the caller takes another replica).
    pub async fn fetch_image(
        &self,
        key: ChunkKey,
    ) -> Result<(u64, [u8; wire::BITMAP_LEN], Vec<u8>), ExportError> {
        let Some(c) = self.get(key) else {
            return Ok((0, [0u8; wire::BITMAP_LEN], Vec::new()));
        };
        let _g = c
            .locks
            .lock(0, BLOCKS_PER_SLOT as u32, false)
            .await
            .map_err(|_| ExportError::Shutdown)?;
        let (version, bm) = {
            let r = c.rec.lock().unwrap();
            let mut bm = [0u8; wire::BITMAP_LEN];
            for b in 0..BLOCKS_PER_SLOT {
                if r.is_written(b) {
                    bm[b / 8] |= 1 << (b % 8);
                }
            }
            (r.version, bm)
        };
        if bm.iter().all(|b| *b == 0) {
            return Ok((version, bm, Vec::new()));
        }
        let buf = AlignedBuf::for_overwrite(SLOT_SIZE as usize);
        let (buf, r) = self
            .read_blocks(&c, 0, BLOCKS_PER_SLOT as u64, buf, 0)
            .await;
        r?;
        let mut out = Vec::new();
        for b in 0..BLOCKS_PER_SLOT {
            if wire::bit(&bm, b) {
                out.extend_from_slice(&buf[b * BLOCK as usize..(b + 1) * BLOCK as usize]);
            }
        }
        Ok((version, bm, out))
    }

    /// Replaces a whole chunk with an image (from `fetch_image` on another replica) and sets
    /// its version to exactly `version`. Written runs are written, the rest deallocated.
    pub async fn install_image(
        &self,
        key: ChunkKey,
        version: u64,
        bm: &[u8; wire::BITMAP_LEN],
        blocks: &[u8],
    ) -> Result<(), ExportError> {
        let data = Arc::new(AlignedBuf::from_slice(blocks));
        let mut pos = 0usize; // position in `blocks`
        let mut b = 0usize;
        let exists = self.get(key).is_some();
        while b < BLOCKS_PER_SLOT {
            let w = wire::bit(bm, b);
            let mut e = b + 1;
            while e < BLOCKS_PER_SLOT && wire::bit(bm, e) == w {
                e += 1;
            }
            let off = b as u64 * BLOCK;
            let len = (e - b) * BLOCK as usize;
            if w {
                self.write_v(
                    key,
                    off,
                    Buf::Shared(data.clone()),
                    pos,
                    len,
                    false,
                    Some(version),
                )
                .await?;
                pos += len;
            } else if exists || self.get(key).is_some() {
                self.zero_v(key, off, len as u64, true, false, false, Some(version))
                    .await?;
            }
            b = e;
        }
        // An empty image on an absent chunk: nothing to keep (absent reads as empty).
        let Some(c) = self.get(key) else {
            return Ok(());
        };
        c.rec.lock().unwrap().version = version;
        self.mark_dirty(&c);
        Ok(())
    }

    /// No new chunk is allocated once this share of all slots is in use (existing chunks
    /// are still written); 1.0 = only a full store refuses.
    pub fn set_full_ratio(&self, ratio: f64) {
        self.full_ratio
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Whether the store is past its full ratio (takes no new chunks).
    pub fn is_full(&self) -> bool {
        let ratio = f64::from_bits(self.full_ratio.load(Ordering::Relaxed));
        let (slots, free) = self.disks.iter().fold((0u64, 0u64), |(s, f), d| {
            (s + d.geo.slots, f + d.free.lock().unwrap().len() as u64)
        });
        slots == 0 || (slots - free + 1) as f64 > ratio * slots as f64
    }

    fn get(&self, key: ChunkKey) -> Option<Arc<Chunk>> {
        self.chunks.read().unwrap().get(&key).cloned()
    }

    fn mark_dirty(&self, c: &Arc<Chunk>) {
        if !c.dirty.swap(true, Ordering::AcqRel) {
            self.dirty.lock().unwrap().push(c.clone());
        }
    }

    fn get_or_alloc(&self, key: ChunkKey) -> Result<Arc<Chunk>, ExportError> {
        if let Some(c) = self.get(key) {
            return Ok(c);
        }
        let mut map = self.chunks.write().unwrap();
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        if self.is_full() {
            self.metrics.nospace_errors.fetch_add(1, Ordering::Relaxed);
            return Err(ExportError::NoSpace);
        }
        let (di, _) = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (i, d.free.lock().unwrap().len()))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0)
            .ok_or_else(|| {
                self.metrics.nospace_errors.fetch_add(1, Ordering::Relaxed);
                ExportError::NoSpace
            })?;
        let slot = self.disks[di]
            .free
            .lock()
            .unwrap()
            .pop()
            .ok_or(ExportError::NoSpace)?;
        let c = Arc::new(Chunk {
            key,
            disk: di,
            slot,
            rec: Mutex::new(SlotRecord::new(key)),
            dirty: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
            locks: RangeLock::default(),
            persist: tokio::sync::Mutex::new(()),
        });
        map.insert(key, c.clone());
        drop(map);
        // The slot's old record generation continues so the new record is the newer copy.
        self.mark_dirty(&c);
        Ok(c)
    }

    fn io_error(&self, e: std::io::Error) -> ExportError {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            self.metrics.nospace_errors.fetch_add(1, Ordering::Relaxed);
            ExportError::NoSpace
        } else {
            self.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
            ExportError::Io(e)
        }
    }

    /// Reads whole blocks `b0..b0+n` of a chunk into `buf[start..]` and checks them: blocks
    /// never written come back as zeroes, written ones must match their crc. Caller holds
    /// the range lock.
    async fn read_blocks(
        &self,
        c: &Chunk,
        b0: u64,
        n: u64,
        buf: AlignedBuf,
        start: usize,
    ) -> (AlignedBuf, Result<(), ExportError>) {
        let disk = &self.disks[c.disk];
        let len = (n * BLOCK) as usize;
        let (mut buf, r) = self
            .engine
            .read(
                &disk.data,
                disk.geo.data_offset(c.slot) + b0 * BLOCK,
                buf,
                start,
                len,
            )
            .await;
        match r {
            Ok(got) if got == len => {}
            Ok(got) => {
                return (
                    buf,
                    Err(ExportError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("short read: {got} of {len} bytes"),
                    ))),
                )
            }
            Err(e) => {
                let e = self.io_error(e);
                return (buf, Err(e));
            }
        }
        let rec = c.rec.lock().unwrap();
        let data = &mut buf.full_mut()[start..start + len];
        for i in 0..n as usize {
            let b = b0 as usize + i;
            let blk = &mut data[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            if !rec.is_written(b) {
                blk.fill(0);
            } else if crc32fast::hash(blk) != rec.crcs[b] {
                self.metrics.checksum_errors.fetch_add(1, Ordering::Relaxed);
                let offset = c.key.index * SLOT_SIZE + b as u64 * BLOCK;
                tracing::error!(volume = c.key.volume, offset, "checksum mismatch");
                self.suspect(c.key);
                return (buf, Err(ExportError::Corrupt { offset }));
            }
        }
        (buf, Ok(()))
    }

    /// Reads `len` bytes at `off` within chunk `key` into `buf[start..start+len]`.
    pub async fn read_into(
        &self,
        key: ChunkKey,
        off: u64,
        mut buf: AlignedBuf,
        start: usize,
        len: usize,
    ) -> (AlignedBuf, Result<(), ExportError>) {
        debug_assert!(off + len as u64 <= SLOT_SIZE);
        self.metrics.read_ops.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let Some(c) = self.get(key) else {
            buf.full_mut()[start..start + len].fill(0);
            return (buf, Ok(()));
        };
        let b0 = off / BLOCK;
        let b1 = (off + len as u64).div_ceil(BLOCK);
        let Ok(_g) = c.locks.lock(b0 as u32, b1 as u32, false).await else {
            return (buf, Err(ExportError::Shutdown));
        };
        if off.is_multiple_of(BLOCK)
            && (len as u64).is_multiple_of(BLOCK)
            && (start as u64).is_multiple_of(BLOCK)
        {
            return self.read_blocks(&c, b0, b1 - b0, buf, start).await;
        }
        let tmp = AlignedBuf::for_overwrite(((b1 - b0) * BLOCK) as usize);
        let (tmp, r) = self.read_blocks(&c, b0, b1 - b0, tmp, 0).await;
        if r.is_ok() {
            let s = (off - b0 * BLOCK) as usize;
            buf.full_mut()[start..start + len].copy_from_slice(&tmp[s..s + len]);
        }
        (buf, r)
    }

    /// Writes whole blocks at `b0` from `data[start..start+len]`. Caller holds the exclusive
    /// range lock.
    async fn write_blocks(
        &self,
        c: &Arc<Chunk>,
        b0: u64,
        data: Buf,
        start: usize,
        len: usize,
        version: Option<u64>,
    ) -> Result<(), ExportError> {
        let crcs: Vec<u32> = data.bytes()[start..start + len]
            .chunks(BLOCK as usize)
            .map(crc32fast::hash)
            .collect();
        let disk = &self.disks[c.disk];
        let (_, r) = self
            .engine
            .write(
                &disk.data,
                disk.geo.data_offset(c.slot) + b0 * BLOCK,
                data,
                start,
                len,
                false,
            )
            .await;
        match r {
            Ok(()) => {
                let mut rec = c.rec.lock().unwrap();
                for (i, crc) in crcs.into_iter().enumerate() {
                    rec.set_written(b0 as usize + i, true);
                    rec.crcs[b0 as usize + i] = crc;
                }
                bump(&mut rec, version);
                drop(rec);
                self.mark_dirty(c);
                Ok(())
            }
            Err(e) => {
                // Part of the data may have reached the disk: re-derive the checksums of the
                // blocks that hold data so they stay readable (their content is undefined
                // after a failed write, as for any disk).
                let n = (len as u64) / BLOCK;
                let probe = AlignedBuf::zeroed(len);
                let (probe, pr) = self
                    .engine
                    .read(
                        &disk.data,
                        disk.geo.data_offset(c.slot) + b0 * BLOCK,
                        probe,
                        0,
                        len,
                    )
                    .await;
                if matches!(pr, Ok(got) if got == len) {
                    let mut rec = c.rec.lock().unwrap();
                    for i in 0..n as usize {
                        if rec.is_written(b0 as usize + i) {
                            rec.crcs[b0 as usize + i] = crc32fast::hash(
                                &probe[i * BLOCK as usize..(i + 1) * BLOCK as usize],
                            );
                        }
                    }
                    bump(&mut rec, version);
                    drop(rec);
                    self.mark_dirty(c);
                }
                Err(self.io_error(e))
            }
        }
    }

    /// Writes `data[start..start+len]` at `off` within chunk `key`; the chunk's version goes
    /// up by one.
    pub async fn write(
        &self,
        key: ChunkKey,
        off: u64,
        data: Buf,
        start: usize,
        len: usize,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.write_v(key, off, data, start, len, fua, None).await
    }

    /// Like `write`, for a replica: the chunk's version becomes at least `version` (the
    /// gateway numbers writes; concurrent writes may land in any order).
    #[allow(clippy::too_many_arguments)]
    pub async fn write_versioned(
        &self,
        key: ChunkKey,
        off: u64,
        data: Buf,
        start: usize,
        len: usize,
        fua: bool,
        version: u64,
    ) -> Result<(), ExportError> {
        self.write_v(key, off, data, start, len, fua, Some(version))
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_v(
        &self,
        key: ChunkKey,
        off: u64,
        data: Buf,
        start: usize,
        len: usize,
        fua: bool,
        version: Option<u64>,
    ) -> Result<(), ExportError> {
        debug_assert!(off + len as u64 <= SLOT_SIZE);
        if len == 0 {
            return Ok(());
        }
        self.metrics.write_ops.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .write_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let c = self.get_or_alloc(key)?;
        let b0 = off / BLOCK;
        let b1 = (off + len as u64).div_ceil(BLOCK);
        let _g = c
            .locks
            .lock(b0 as u32, b1 as u32, true)
            .await
            .map_err(|_| ExportError::Shutdown)?;
        if off.is_multiple_of(BLOCK)
            && (len as u64).is_multiple_of(BLOCK)
            && (start as u64).is_multiple_of(BLOCK)
        {
            self.write_blocks(&c, b0, data, start, len, version).await?;
        } else {
            // Read-modify-write of the partial head and tail blocks.
            let n = b1 - b0;
            let mut tmp = AlignedBuf::for_overwrite((n * BLOCK) as usize);
            let head = !off.is_multiple_of(BLOCK);
            let tail = !(off + len as u64).is_multiple_of(BLOCK);
            if head {
                let (t, r) = self.read_blocks(&c, b0, 1, tmp, 0).await;
                tmp = t;
                r?;
            }
            if tail && (n > 1 || !head) {
                let (t, r) = self
                    .read_blocks(&c, b1 - 1, 1, tmp, ((n - 1) * BLOCK) as usize)
                    .await;
                tmp = t;
                r?;
            }
            let s = (off - b0 * BLOCK) as usize;
            tmp[s..s + len].copy_from_slice(&data.bytes()[start..start + len]);
            let total = tmp.len();
            self.write_blocks(&c, b0, Buf::Aligned(tmp), 0, total, version)
                .await?;
        }
        if fua {
            self.persist(&c).await?;
            self.engine
                .fdatasync(&self.disks[c.disk].meta)
                .await
                .map_err(|e| self.io_error(e))?;
        }
        Ok(())
    }

    /// Deallocates (`punch`) or zeroes-in-place the range; it reads as zeroes afterwards.
    /// Returns `Unsupported` if `fast` and the disk cannot do it without writing data.
    pub async fn zero(
        &self,
        key: ChunkKey,
        off: u64,
        len: u64,
        punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.zero_v(key, off, len, punch, fast, fua, None).await
    }

    /// `zero` for a replica: the chunk's version becomes at least `version`.
    #[allow(clippy::too_many_arguments)]
    pub async fn zero_versioned(
        &self,
        key: ChunkKey,
        off: u64,
        len: u64,
        punch: bool,
        fua: bool,
        version: u64,
    ) -> Result<(), ExportError> {
        self.zero_v(key, off, len, punch, false, fua, Some(version))
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn zero_v(
        &self,
        key: ChunkKey,
        off: u64,
        len: u64,
        punch: bool,
        fast: bool,
        fua: bool,
        version: Option<u64>,
    ) -> Result<(), ExportError> {
        debug_assert!(off + len <= SLOT_SIZE);
        self.metrics.discard_ops.fetch_add(1, Ordering::Relaxed);
        let c = if punch {
            match self.get(key) {
                Some(c) => c,
                // Never written: already reads as zeroes (replicas compare an absent chunk
                // equal to an empty one, so nothing is allocated to record the version).
                None => return Ok(()),
            }
        } else {
            self.get_or_alloc(key)?
        };
        let b0 = off / BLOCK;
        let b1 = (off + len).div_ceil(BLOCK);
        let _g = c
            .locks
            .lock(b0 as u32, b1 as u32, true)
            .await
            .map_err(|_| ExportError::Shutdown)?;
        let fb0 = off.div_ceil(BLOCK);
        let fb1 = (off + len) / BLOCK;
        let disk = &self.disks[c.disk];
        // Partial blocks at either end: zero their part by read-modify-write.
        let mut partial = Vec::new();
        if !off.is_multiple_of(BLOCK) {
            partial.push((b0, off, ((b0 + 1) * BLOCK).min(off + len)));
        }
        if !(off + len).is_multiple_of(BLOCK) && (b1 - 1 != b0 || off.is_multiple_of(BLOCK)) {
            partial.push((b1 - 1, ((b1 - 1) * BLOCK).max(off), off + len));
        }
        for (pb, lo, hi) in partial {
            let (mut blk, r) = self
                .read_blocks(&c, pb, 1, AlignedBuf::zeroed(BLOCK as usize), 0)
                .await;
            r?;
            let s = (lo - pb * BLOCK) as usize;
            blk[s..s + (hi - lo) as usize].fill(0);
            self.write_blocks(&c, pb, Buf::Aligned(blk), 0, BLOCK as usize, version)
                .await?;
        }
        if fb1 > fb0 {
            let mode = if punch {
                crate::sys::PUNCH_HOLE
            } else {
                crate::sys::ZERO_RANGE
            };
            let r = self
                .engine
                .fallocate(
                    &disk.data,
                    disk.geo.data_offset(c.slot) + fb0 * BLOCK,
                    (fb1 - fb0) * BLOCK,
                    mode,
                )
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    if fast {
                        return Err(ExportError::Unsupported);
                    }
                    // Write zeroes instead, in pieces.
                    let mut b = fb0;
                    while b < fb1 {
                        let n = (fb1 - b).min(256);
                        let z = AlignedBuf::zeroed((n * BLOCK) as usize);
                        self.write_blocks(&c, b, Buf::Aligned(z), 0, (n * BLOCK) as usize, version)
                            .await?;
                        b += n;
                    }
                }
                Err(e) => return Err(self.io_error(e)),
            }
            let mut rec = c.rec.lock().unwrap();
            for b in fb0..fb1 {
                rec.set_written(b as usize, !punch);
                rec.crcs[b as usize] = zero_block_crc();
            }
            bump(&mut rec, version);
            drop(rec);
            self.mark_dirty(&c);
        }
        if fua {
            self.persist(&c).await?;
            self.engine
                .fdatasync(&disk.meta)
                .await
                .map_err(|e| self.io_error(e))?;
        }
        Ok(())
    }

    /// Allocation of `off..off+len` within a chunk as runs of `(length, written)`.
    pub fn allocation(&self, key: ChunkKey, off: u64, len: u64) -> Vec<(u64, bool)> {
        let Some(c) = self.get(key) else {
            return vec![(len, false)];
        };
        let rec = c.rec.lock().unwrap();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let b = pos / BLOCK;
            let next = ((b + 1) * BLOCK).min(end);
            let w = rec.is_written(b as usize);
            match out.last_mut() {
                Some((l, lw)) if *lw == w => *l += next - pos,
                _ => out.push((next - pos, w)),
            }
            pos = next;
        }
        out
    }

    /// Writes a chunk's record (next copy) if it changed. Skips deleted chunks.
    async fn persist(&self, c: &Arc<Chunk>) -> Result<(), ExportError> {
        let _p = c.persist.lock().await;
        if c.deleted.load(Ordering::Acquire) {
            return Ok(());
        }
        c.dirty.store(false, Ordering::Release);
        if let Err(e) = self.write_record_copy(c, false).await {
            self.mark_dirty(c);
            return Err(self.io_error(e));
        }
        Ok(())
    }

    /// Writes the next generation of a chunk's record (or a free record) into the copy it
    /// belongs to; the other copy keeps the previous generation in case this write tears.
    async fn write_record_copy(&self, c: &Chunk, free: bool) -> std::io::Result<()> {
        let disk = &self.disks[c.disk];
        let (bytes, off) = {
            let mut rec = c.rec.lock().unwrap();
            rec.gen += 1;
            let bytes = if free {
                SlotRecord::encode_free(rec.gen)
            } else {
                rec.encode()
            };
            (
                bytes,
                disk.geo.record_offset(c.slot) + SlotRecord::copy_offset(rec.gen),
            )
        };
        let (_, r) = self
            .engine
            .write(
                &disk.meta,
                off,
                Buf::Vec(bytes),
                0,
                COPY_SIZE as usize,
                false,
            )
            .await;
        r
    }

    /// Makes every completed write durable: records of changed chunks, then fdatasync.
    pub async fn flush(&self) -> Result<(), ExportError> {
        self.metrics.flush_ops.fetch_add(1, Ordering::Relaxed);
        let list = std::mem::take(&mut *self.dirty.lock().unwrap());
        let results = futures::future::join_all(list.iter().map(|c| self.persist(c))).await;
        let mut first_err = None;
        for r in results {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        let syncs =
            futures::future::join_all(self.disks.iter().map(|d| self.engine.fdatasync(&d.meta)))
                .await;
        for r in syncs {
            if let Err(e) = r {
                first_err.get_or_insert(self.io_error(e));
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Removes every chunk of a volume and gives its space back. In-flight I/O on those
    /// chunks finishes first; later I/O gets `Shutdown`.
    pub async fn delete_volume(&self, volume: u64) -> Result<u64, ExportError> {
        self.delete_chunks(volume, |_| true).await
    }

    /// Removes the chunks of `volume` whose index `which` selects (re-homed replicas), as
    /// [`ChunkStore::delete_volume`] does; returns how many went.
    pub async fn delete_chunks(
        &self,
        volume: u64,
        which: impl Fn(u64) -> bool,
    ) -> Result<u64, ExportError> {
        let victims: Vec<Arc<Chunk>> = {
            let mut map = self.chunks.write().unwrap();
            let keys: Vec<ChunkKey> = map
                .keys()
                .filter(|k| k.volume == volume && which(k.index))
                .copied()
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for c in &victims {
            c.locks.close().await;
            let _p = c.persist.lock().await;
            c.deleted.store(true, Ordering::Release);
            self.write_record_copy(c, true)
                .await
                .map_err(|e| self.io_error(e))?;
        }
        for d in &self.disks {
            self.engine
                .fdatasync(&d.meta)
                .await
                .map_err(|e| self.io_error(e))?;
        }
        // Records are durable: the slots can be punched and reused.
        for c in &victims {
            let disk = &self.disks[c.disk];
            if let Err(e) = self
                .engine
                .fallocate(
                    &disk.data,
                    disk.geo.data_offset(c.slot),
                    SLOT_SIZE,
                    crate::sys::PUNCH_HOLE,
                )
                .await
            {
                tracing::debug!(error = %e, "punching a freed slot failed; space is not returned");
            }
            disk.free.lock().unwrap().push(c.slot);
        }
        Ok(victims.len() as u64)
    }

    /// Flushes and marks every disk clean (call on orderly shutdown).
    pub async fn close(&self) -> Result<(), ExportError> {
        self.flush().await?;
        for d in &self.disks {
            let bytes = {
                let mut sb = d.sb.lock().unwrap();
                sb.clean = true;
                sb.encode()
            };
            let (_, r) = self
                .engine
                .write(
                    &d.meta,
                    0,
                    Buf::Vec(bytes),
                    0,
                    layout::SUPERBLOCK_SIZE as usize,
                    false,
                )
                .await;
            r.map_err(|e| self.io_error(e))?;
            self.engine
                .fdatasync(&d.meta)
                .await
                .map_err(|e| self.io_error(e))?;
        }
        Ok(())
    }

    /// Prometheus text for the store's counters and disk usage.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let m = &self.metrics;
        for (name, help, v) in [
            ("blockd_store_read_ops_total", "Chunk reads.", &m.read_ops),
            (
                "blockd_store_write_ops_total",
                "Chunk writes.",
                &m.write_ops,
            ),
            (
                "blockd_store_read_bytes_total",
                "Bytes read from chunks.",
                &m.read_bytes,
            ),
            (
                "blockd_store_write_bytes_total",
                "Bytes written to chunks.",
                &m.write_bytes,
            ),
            (
                "blockd_store_discard_ops_total",
                "Trim / write-zeroes operations.",
                &m.discard_ops,
            ),
            ("blockd_store_flush_ops_total", "Flushes.", &m.flush_ops),
            (
                "blockd_store_checksum_errors_total",
                "Blocks that failed their crc32.",
                &m.checksum_errors,
            ),
            (
                "blockd_store_io_errors_total",
                "Disk I/O errors.",
                &m.io_errors,
            ),
            (
                "blockd_store_nospace_errors_total",
                "Writes refused for lack of space.",
                &m.nospace_errors,
            ),
            (
                "blockd_store_restamped_blocks_total",
                "Checksums re-derived after an unclean stop.",
                &m.restamped_blocks,
            ),
            (
                "blockd_store_bad_records_total",
                "Unreadable slot records (slots quarantined).",
                &m.bad_records,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP blockd_disk_capacity_bytes Chunk capacity of a disk.\n# TYPE blockd_disk_capacity_bytes gauge");
        let stats = self.stats();
        for s in &stats {
            let _ = writeln!(
                out,
                "blockd_disk_capacity_bytes{{path=\"{}\"}} {}",
                s.path, s.capacity
            );
        }
        let _ = writeln!(out, "# HELP blockd_disk_used_bytes Bytes of written blocks on a disk.\n# TYPE blockd_disk_used_bytes gauge");
        for s in &stats {
            let _ = writeln!(
                out,
                "blockd_disk_used_bytes{{path=\"{}\"}} {}",
                s.path, s.used
            );
        }
        let _ = writeln!(out, "# HELP blockd_disk_free_slots Free 4 MiB slots on a disk.\n# TYPE blockd_disk_free_slots gauge");
        for s in &stats {
            let _ = writeln!(
                out,
                "blockd_disk_free_slots{{path=\"{}\"}} {}",
                s.path, s.free_slots
            );
        }
    }
}

#[cfg(test)]
mod tests;

/// A chunk's version after a change: one more, or for a replica at least the gateway's.
fn bump(rec: &mut SlotRecord, version: Option<u64>) {
    match version {
        Some(v) => rec.version = rec.version.max(v),
        None => rec.version += 1,
    }
}
