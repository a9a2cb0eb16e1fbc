//! On-disk layout of a chunk-store disk: pure encode/decode, no I/O.
//!
//! ```text
//! 0            4 KiB                         data_offset (4 MiB aligned)
//! | superblock | slot records (2 × 8 KiB each) … | slot 0 data (4 MiB) | slot 1 data | …
//! ```
//! A slot record describes the chunk stored in the slot: which volume and chunk index, its
//! version, which 4 KiB blocks were ever written (bitmap) and a crc32 of every block. Every
//! structure carries its own crc32 so a torn or foreign record is recognised, never trusted.

pub const BLOCK: u64 = 4096;
pub const SLOT_SIZE: u64 = 4 << 20;
pub const BLOCKS_PER_SLOT: usize = (SLOT_SIZE / BLOCK) as usize;
/// Each slot has two record copies written alternately (by generation), so a write torn by a
/// crash always leaves the previous copy intact.
pub const RECORD_SIZE: u64 = 2 * COPY_SIZE;
pub const COPY_SIZE: u64 = 8192;
pub const SUPERBLOCK_SIZE: u64 = 4096;
const SB_MAGIC: &[u8; 8] = b"FABDISK1";
const REC_MAGIC: u32 = 0x4643_4852; // "FCHR"
/// Bytes of the record header + bitmap + crc table that are meaningful.
pub const RECORD_USED: usize = HDR_LEN + BITMAP_LEN + BLOCKS_PER_SLOT * 4 + 4;
const HDR_LEN: usize = 40;
const BITMAP_LEN: usize = BLOCKS_PER_SLOT / 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("not a fabric disk (bad magic)")]
    BadMagic,
    #[error("superblock checksum mismatch")]
    BadChecksum,
    #[error("unsupported layout: {0}")]
    Unsupported(String),
    #[error("disk too small: {0} bytes, need at least {1}")]
    TooSmall(u64, u64),
}

/// Where things are on a disk of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub slots: u64,
    pub records_offset: u64,
    pub data_offset: u64,
}

impl Geometry {
    /// The largest number of slots that fit in `size` bytes.
    pub fn for_size(size: u64) -> Result<Geometry, LayoutError> {
        let min = SUPERBLOCK_SIZE + RECORD_SIZE + SLOT_SIZE;
        if size < SLOT_SIZE * 2 {
            return Err(LayoutError::TooSmall(
                size,
                min.next_multiple_of(SLOT_SIZE) + SLOT_SIZE,
            ));
        }
        // records for n slots must fit before data_offset, which is 4 MiB aligned.
        let mut slots = size / SLOT_SIZE;
        loop {
            let data_offset = (SUPERBLOCK_SIZE + slots * RECORD_SIZE).next_multiple_of(SLOT_SIZE);
            if data_offset + slots * SLOT_SIZE <= size {
                return Ok(Geometry {
                    slots,
                    records_offset: SUPERBLOCK_SIZE,
                    data_offset,
                });
            }
            if slots == 1 {
                return Err(LayoutError::TooSmall(size, min));
            }
            slots -= 1;
        }
    }

    pub fn record_offset(&self, slot: u64) -> u64 {
        self.records_offset + slot * RECORD_SIZE
    }

    pub fn data_offset(&self, slot: u64) -> u64 {
        self.data_offset + slot * SLOT_SIZE
    }
}

/// The first 4 KiB of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub disk_id: u64,
    /// The cluster this disk belongs to (empty until the node first registers).
    pub cluster_id: String,
    pub size: u64,
    pub slots: u64,
    /// false while a blockd has the disk open; true after a clean shutdown.
    pub clean: bool,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SIZE as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes()); // layout version
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..24].copy_from_slice(&SLOT_SIZE.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        b[40..48].copy_from_slice(&self.slots.to_le_bytes());
        b[48] = self.clean as u8;
        let cid = self.cluster_id.as_bytes();
        let n = cid.len().min(64);
        b[49] = n as u8;
        b[50..50 + n].copy_from_slice(&cid[..n]);
        let crc = crc32fast::hash(&b[..4092]);
        b[4092..4096].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, LayoutError> {
        if b.len() < SUPERBLOCK_SIZE as usize || &b[0..8] != SB_MAGIC {
            return Err(LayoutError::BadMagic);
        }
        let crc = u32::from_le_bytes(b[4092..4096].try_into().unwrap());
        if crc32fast::hash(&b[..4092]) != crc {
            return Err(LayoutError::BadChecksum);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(8) != 1 {
            return Err(LayoutError::Unsupported(format!(
                "layout version {}",
                u32_at(8)
            )));
        }
        if u32_at(12) as u64 != BLOCK || u64_at(16) != SLOT_SIZE {
            return Err(LayoutError::Unsupported("block or slot size".into()));
        }
        let n = (b[49] as usize).min(64);
        Ok(Superblock {
            disk_id: u64_at(24),
            size: u64_at(32),
            slots: u64_at(40),
            clean: b[48] == 1,
            cluster_id: String::from_utf8_lossy(&b[50..50 + n]).into_owned(),
        })
    }
}

/// Identifies a chunk: volume id and chunk index within the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub volume: u64,
    pub index: u64,
}

/// The record of one slot: which chunk lives there and the state of each block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// Bumped at every persist; picks the newer of the two copies.
    pub gen: u64,
    pub key: ChunkKey,
    pub version: u64,
    /// Bit i set: block i holds written data (else it reads as zeroes).
    pub written: [u64; BLOCKS_PER_SLOT / 64],
    /// crc32 of each block's 4 KiB (of zeroes when not written).
    pub crcs: Vec<u32>,
}

/// crc32 of a 4 KiB block of zeroes.
pub fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&[0u8; BLOCK as usize]))
}

impl SlotRecord {
    pub fn new(key: ChunkKey) -> SlotRecord {
        SlotRecord {
            gen: 0,
            key,
            version: 0,
            written: [0; BLOCKS_PER_SLOT / 64],
            crcs: vec![zero_block_crc(); BLOCKS_PER_SLOT],
        }
    }

    pub fn is_written(&self, block: usize) -> bool {
        self.written[block / 64] & (1 << (block % 64)) != 0
    }

    pub fn set_written(&mut self, block: usize, on: bool) {
        if on {
            self.written[block / 64] |= 1 << (block % 64);
        } else {
            self.written[block / 64] &= !(1 << (block % 64));
        }
    }

    pub fn written_blocks(&self) -> u64 {
        self.written.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Byte offset of the copy that generation `gen` goes to, within the slot's record.
    pub fn copy_offset(gen: u64) -> u64 {
        (gen % 2) * COPY_SIZE
    }

    /// Encodes one copy (`COPY_SIZE` bytes) of an in-use record.
    pub fn encode(&self) -> Vec<u8> {
        encode_copy(self.gen, Some(self))
    }

    /// Encodes one copy of a free record with generation `gen`.
    pub fn encode_free(gen: u64) -> Vec<u8> {
        encode_copy(gen, None)
    }

    /// Decodes one copy: `Ok((gen, None))` for a free record, an error for a copy that fails
    /// its checksum (torn, never written, or foreign).
    pub fn decode(b: &[u8]) -> Result<(u64, Option<SlotRecord>), LayoutError> {
        if b.len() < RECORD_USED {
            return Err(LayoutError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(0) != REC_MAGIC {
            return Err(LayoutError::BadMagic);
        }
        let end = RECORD_USED - 4;
        if crc32fast::hash(&b[..end]) != u32_at(end) {
            return Err(LayoutError::BadChecksum);
        }
        let gen = u64_at(32);
        match u32_at(4) {
            0 => return Ok((gen, None)),
            1 => {}
            s => return Err(LayoutError::Unsupported(format!("record state {s}"))),
        }
        let mut r = SlotRecord::new(ChunkKey {
            volume: u64_at(8),
            index: u64_at(16),
        });
        r.version = u64_at(24);
        r.gen = gen;
        let mut o = HDR_LEN;
        for w in r.written.iter_mut() {
            *w = u64_at(o);
            o += 8;
        }
        for c in r.crcs.iter_mut() {
            *c = u32_at(o);
            o += 4;
        }
        Ok((gen, Some(r)))
    }

    /// Picks the current state of a slot from its two copies (`RECORD_SIZE` bytes):
    /// the valid copy with the highest generation. `Ok(None)` for a free or never-used slot;
    /// an error when neither copy is valid but the slot is not blank.
    pub fn decode_slot(b: &[u8]) -> Result<(u64, Option<SlotRecord>), LayoutError> {
        let c = COPY_SIZE as usize;
        if b.len() < 2 * c {
            return Err(LayoutError::BadMagic);
        }
        let a = Self::decode(&b[..c]);
        let z = Self::decode(&b[c..2 * c]);
        match (a, z) {
            (Ok(x), Ok(y)) => Ok(if y.0 > x.0 { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(e), Err(_)) => {
                if b[..2 * c].iter().all(|&x| x == 0) {
                    Ok((0, None))
                } else {
                    Err(e)
                }
            }
        }
    }
}

fn encode_copy(gen: u64, rec: Option<&SlotRecord>) -> Vec<u8> {
    let mut b = vec![0u8; COPY_SIZE as usize];
    b[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    b[32..40].copy_from_slice(&gen.to_le_bytes());
    let mut o = HDR_LEN;
    if let Some(r) = rec {
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..16].copy_from_slice(&r.key.volume.to_le_bytes());
        b[16..24].copy_from_slice(&r.key.index.to_le_bytes());
        b[24..32].copy_from_slice(&r.version.to_le_bytes());
        for w in &r.written {
            b[o..o + 8].copy_from_slice(&w.to_le_bytes());
            o += 8;
        }
        for c in &r.crcs {
            b[o..o + 4].copy_from_slice(&c.to_le_bytes());
            o += 4;
        }
    }
    let end = RECORD_USED - 4;
    let crc = crc32fast::hash(&b[..end]);
    b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert!(Geometry::for_size(4 << 20).is_err());
        let g = Geometry::for_size(64 << 20).unwrap();
        assert_eq!(g.data_offset % SLOT_SIZE, 0);
        assert!(g.data_offset + g.slots * SLOT_SIZE <= 64 << 20);
        assert_eq!(g.slots, 15);
        let g = Geometry::for_size(1 << 40).unwrap();
        assert!(g.slots > 260_000 && g.data_offset + g.slots * SLOT_SIZE <= 1 << 40);
    }

    #[test]
    fn superblock_roundtrip_and_errors() {
        let sb = Superblock {
            disk_id: 7,
            cluster_id: "c-1".into(),
            size: 1 << 30,
            slots: 200,
            clean: true,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(LayoutError::BadChecksum));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(LayoutError::BadMagic));
        assert_eq!(Superblock::decode(&[0u8; 10]), Err(LayoutError::BadMagic));
    }

    #[test]
    fn record_roundtrip_and_errors() {
        let mut r = SlotRecord::new(ChunkKey {
            volume: 3,
            index: 9,
        });
        r.version = 42;
        r.gen = 5;
        r.set_written(0, true);
        r.set_written(1023, true);
        r.crcs[5] = 0xdead_beef;
        let mut b = r.encode();
        assert_eq!(b.len(), COPY_SIZE as usize);
        assert_eq!(SlotRecord::decode(&b).unwrap(), (5, Some(r.clone())));
        assert_eq!(r.written_blocks(), 2);
        assert_eq!(
            SlotRecord::decode(&SlotRecord::encode_free(8)).unwrap(),
            (8, None)
        );
        b[300] ^= 0x10;
        assert_eq!(SlotRecord::decode(&b), Err(LayoutError::BadChecksum));
        b[0] ^= 1;
        assert_eq!(SlotRecord::decode(&b), Err(LayoutError::BadMagic));
        assert_eq!(SlotRecord::decode(&[1, 2, 3]), Err(LayoutError::BadMagic));
    }

    #[test]
    fn slot_picks_newest_valid_copy() {
        let mut r = SlotRecord::new(ChunkKey {
            volume: 1,
            index: 0,
        });
        let mut slot = vec![0u8; RECORD_SIZE as usize];
        assert_eq!(SlotRecord::decode_slot(&slot).unwrap(), (0, None));
        for gen in 1..=3u64 {
            r.gen = gen;
            r.version = gen * 10;
            let o = SlotRecord::copy_offset(gen) as usize;
            slot[o..o + COPY_SIZE as usize].copy_from_slice(&r.encode());
        }
        let (g, got) = SlotRecord::decode_slot(&slot).unwrap();
        assert_eq!((g, got.unwrap().version), (3, 30));
        // Tear the newest copy (gen 3 lives in copy 1): the previous one wins.
        slot[COPY_SIZE as usize + 100] ^= 0xff;
        let (g, got) = SlotRecord::decode_slot(&slot).unwrap();
        assert_eq!((g, got.unwrap().version), (2, 20));
        // Both torn: an error, not a guess.
        slot[100] ^= 0xff;
        assert!(SlotRecord::decode_slot(&slot).is_err());
        // A freed slot.
        let o = SlotRecord::copy_offset(4) as usize;
        slot[o..o + COPY_SIZE as usize].copy_from_slice(&SlotRecord::encode_free(4));
        assert_eq!(SlotRecord::decode_slot(&slot).unwrap(), (4, None));
    }
}
