//! Store-side scrub and repair: verify the stored crc32 of written blocks without failing,
//! and put one good block back in place (the chunk's version and checksums stay as they are:
//! a repair restores the data the record already describes, it is not a write).

use super::{ChunkKey, ChunkStore, BLOCK, BLOCKS_PER_SLOT};
use crate::buf::AlignedBuf;
use crate::export::ExportError;
use crate::uring::Buf;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// What a scrub of part of a chunk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Bytes of written blocks read and checked.
    pub bytes: u64,
    /// Written blocks whose data fails their crc32.
    pub bad: Vec<u32>,
}

/// The result of `repair_block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairOutcome {
    /// The block was written back with the good data.
    Repaired,
    /// The block on disk matches its checksum now (rewritten meanwhile): nothing to do.
    AlreadyGood,
    /// The offered data does not match this copy's checksum for the block (another
    /// version): not written.
    Mismatch,
    /// The chunk is not stored here (any more) or the block was never written.
    Gone,
}

impl ChunkStore {
    /// Records that a read found a bad checksum in `key` (the scrubber repairs it).
    pub(super) fn suspect(&self, key: ChunkKey) {
        if self.suspects.lock().unwrap().insert(key) {
            self.suspect_added.notify_one();
        }
    }

    /// Takes the chunks reads found bad checksums in.
    pub fn take_suspects(&self) -> Vec<ChunkKey> {
        std::mem::take(&mut *self.suspects.lock().unwrap())
            .into_iter()
            .collect()
    }

    /// Every chunk stored here, in key order.
    pub fn chunk_keys(&self) -> Vec<ChunkKey> {
        let mut v: Vec<ChunkKey> = self.chunks.read().unwrap().keys().copied().collect();
        v.sort();
        v
    }

    /// Where a chunk's data lives: the disk's path and the byte offset of its slot (for
    /// diagnostics and tests that damage a copy on purpose).
    pub fn locate(&self, key: ChunkKey) -> Option<(PathBuf, u64)> {
        let c = self.get(key)?;
        let d = &self.disks[c.disk];
        Some((d.path.clone(), d.geo.data_offset(c.slot)))
    }

    /// Checks the written blocks `b0..b1` of a chunk against their crc32 (under a shared range
    /// lock, so writes in flight are never mistaken for damage). Bad blocks are reported, not
    /// returned as an error; blocks never written are skipped.
    pub async fn scrub_blocks(
        &self,
        key: ChunkKey,
        b0: u32,
        b1: u32,
    ) -> Result<ScrubReport, ExportError> {
        let b1 = b1.min(BLOCKS_PER_SLOT as u32);
        let mut rep = ScrubReport::default();
        let Some(c) = self.get(key) else {
            return Ok(rep);
        };
        if b0 >= b1 {
            return Ok(rep);
        }
        let any = {
            let r = c.rec.lock().unwrap();
            (b0..b1).any(|b| r.is_written(b as usize))
        };
        if !any {
            return Ok(rep);
        }
        let _g = c
            .locks
            .lock(b0, b1, false)
            .await
            .map_err(|_| ExportError::Shutdown)?;
        let disk = &self.disks[c.disk];
        let len = (b1 - b0) as usize * BLOCK as usize;
        let buf = AlignedBuf::for_overwrite(len);
        let (buf, r) = self
            .engine
            .read(
                &disk.data,
                disk.geo.data_offset(c.slot) + b0 as u64 * BLOCK,
                buf,
                0,
                len,
            )
            .await;
        match r {
            Ok(n) if n == len => {}
            Ok(n) => {
                return Err(ExportError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short read: {n} of {len} bytes"),
                )))
            }
            Err(e) => return Err(self.io_error(e)),
        }
        if c.deleted.load(Ordering::Acquire) {
            return Ok(rep);
        }
        let rec = c.rec.lock().unwrap();
        for b in b0..b1 {
            if !rec.is_written(b as usize) {
                continue;
            }
            let i = (b - b0) as usize * BLOCK as usize;
            rep.bytes += BLOCK;
            if crc32fast::hash(&buf[i..i + BLOCK as usize]) != rec.crcs[b as usize] {
                rep.bad.push(b);
            }
        }
        Ok(rep)
    }

    /// The crc32 this copy's record holds for block `b` of a chunk (None: not stored here or
    /// never written).
    pub fn block_crc(&self, key: ChunkKey, b: u32) -> Option<u32> {
        let c = self.get(key)?;
        let r = c.rec.lock().unwrap();
        ((b as usize) < BLOCKS_PER_SLOT && r.is_written(b as usize)).then(|| r.crcs[b as usize])
    }

    /// Puts good data back into block `b` of a chunk whose copy here is damaged. Under the
    /// block's exclusive lock: the block is read again (a write may have replaced it), and
    /// `data` is written only if its crc32 is the one this copy's record holds for the block,
    /// so a repair can only restore what this copy acknowledged, never install another
    /// version. Version and checksums are unchanged.
    pub async fn repair_block(
        &self,
        key: ChunkKey,
        b: u32,
        data: &[u8],
    ) -> Result<RepairOutcome, ExportError> {
        if data.len() != BLOCK as usize || b as usize >= BLOCKS_PER_SLOT {
            return Ok(RepairOutcome::Mismatch);
        }
        let Some(c) = self.get(key) else {
            return Ok(RepairOutcome::Gone);
        };
        let _g = c
            .locks
            .lock(b, b + 1, true)
            .await
            .map_err(|_| ExportError::Shutdown)?;
        let want = {
            let r = c.rec.lock().unwrap();
            if !r.is_written(b as usize) || c.deleted.load(Ordering::Acquire) {
                return Ok(RepairOutcome::Gone);
            }
            r.crcs[b as usize]
        };
        let disk = &self.disks[c.disk];
        let off = disk.geo.data_offset(c.slot) + b as u64 * BLOCK;
        let cur = AlignedBuf::for_overwrite(BLOCK as usize);
        let (cur, r) = self
            .engine
            .read(&disk.data, off, cur, 0, BLOCK as usize)
            .await;
        if matches!(r, Ok(n) if n == BLOCK as usize) && crc32fast::hash(&cur[..]) == want {
            return Ok(RepairOutcome::AlreadyGood);
        }
        if crc32fast::hash(data) != want {
            return Ok(RepairOutcome::Mismatch);
        }
        let (_, r) = self
            .engine
            .write(
                &disk.data,
                off,
                Buf::Aligned(AlignedBuf::from_slice(data)),
                0,
                BLOCK as usize,
                false,
            )
            .await;
        r.map_err(|e| self.io_error(e))?;
        self.engine
            .fdatasync(&disk.meta)
            .await
            .map_err(|e| self.io_error(e))?;
        Ok(RepairOutcome::Repaired)
    }
}
