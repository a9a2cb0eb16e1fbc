use super::*;
use std::os::unix::fs::MetadataExt;

fn cfg(dir: &Path, name: &str, size: u64) -> DiskConfig {
    DiskConfig {
        path: dir.join(name),
        size: Some(size),
    }
}

fn key(v: u64, i: u64) -> ChunkKey {
    ChunkKey {
        volume: v,
        index: i,
    }
}

fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
    }
    b
}

async fn read(s: &ChunkStore, k: ChunkKey, off: u64, len: usize) -> Result<Vec<u8>, ExportError> {
    let (b, r) = s.read_into(k, off, AlignedBuf::zeroed(len), 0, len).await;
    r.map(|_| b.to_vec())
}

async fn write(s: &ChunkStore, k: ChunkKey, off: u64, data: &[u8]) -> Result<(), ExportError> {
    s.write(
        k,
        off,
        Buf::Aligned(AlignedBuf::from_slice(data)),
        0,
        data.len(),
        false,
    )
    .await
}

#[test]
fn parse_sizes_and_disks() {
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("10G").unwrap(), 10 << 30);
    assert_eq!(parse_size("1.5K").unwrap(), 1536);
    assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
    assert!(parse_size("ten").is_err());
    assert!(parse_size("5Q").is_err());
    assert!(parse_size("-1").is_err());
    assert_eq!(
        DiskConfig::parse("/d/x.img:1G").unwrap(),
        DiskConfig {
            path: "/d/x.img".into(),
            size: Some(1 << 30)
        }
    );
    assert_eq!(DiskConfig::parse("/dev/sdb").unwrap().size, None);
    assert!(DiskConfig::parse("/x:big").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundtrip_aligned_unaligned_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(&[cfg(dir.path(), "d0", 64 << 20)]).unwrap();
    let k = key(1, 0);
    assert_eq!(read(&s, k, 0, 8192).await.unwrap(), vec![0; 8192]);
    let p = pattern(3 * 4096, 5);
    write(&s, k, 4096, &p).await.unwrap();
    assert_eq!(read(&s, k, 4096, p.len()).await.unwrap(), p.to_vec());
    // Unaligned overwrite in the middle of a block, then unaligned read across blocks.
    write(&s, k, 4096 + 100, b"hello world").await.unwrap();
    let got = read(&s, k, 4096 + 90, 30).await.unwrap();
    let mut want = p[90..120].to_vec();
    want[10..21].copy_from_slice(b"hello world");
    assert_eq!(got, want);
    // Unaligned write into a never-written block keeps the rest zero.
    write(&s, k, 100 * 4096 + 7, b"x").await.unwrap();
    let got = read(&s, k, 100 * 4096, 4096).await.unwrap();
    assert_eq!(got[7], b'x');
    assert_eq!(got.iter().filter(|&&b| b != 0).count(), 1);
    assert_eq!(
        s.allocation(k, 0, 8 * 4096),
        vec![(4096, false), (3 * 4096, true), (4 * 4096, false)]
    );
    assert_eq!(s.allocation(key(9, 9), 0, 100), vec![(100, false)]);
    let v = s.chunk_version(k).unwrap();
    assert!(v >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_clean_and_unclean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disks = [
        cfg(dir.path(), "d0", 64 << 20),
        cfg(dir.path(), "d1", 64 << 20),
    ];
    let p = pattern(1 << 20, 9);
    {
        let s = ChunkStore::open(&disks).unwrap();
        for i in 0..4 {
            write(&s, key(2, i), 4096 * i, &p).await.unwrap();
        }
        s.close().await.unwrap();
    }
    {
        let s = ChunkStore::open(&disks).unwrap();
        assert_eq!(s.metrics.restamped_blocks.load(Ordering::Relaxed), 0);
        for i in 0..4 {
            assert_eq!(
                read(&s, key(2, i), 4096 * i, p.len()).await.unwrap(),
                p.to_vec()
            );
        }
        // Flushed, then more writes that never get flushed, then a "crash" (no close).
        s.flush().await.unwrap();
        write(&s, key(2, 0), 0, &pattern(4096, 77)).await.unwrap();
        let v = s.chunk_version(key(2, 0)).unwrap();
        write(&s, key(2, 0), 0, &pattern(4096, 78)).await.unwrap();
        s.flush().await.unwrap();
        assert!(s.chunk_version(key(2, 0)).unwrap() > v);
        // Overwrite after the flush, not flushed: record on disk has the old crc.
        write(&s, key(2, 1), 4096, &pattern(4096, 79))
            .await
            .unwrap();
    }
    let s = ChunkStore::open(&disks).unwrap();
    assert!(
        s.metrics.restamped_blocks.load(Ordering::Relaxed) >= 1,
        "unflushed overwrite re-stamped"
    );
    assert_eq!(
        read(&s, key(2, 0), 0, 4096).await.unwrap(),
        pattern(4096, 78).to_vec()
    );
    // Every block reads without checksum errors.
    for i in 0..4 {
        read(&s, key(2, i), 0, 4 << 20).await.unwrap();
    }
    assert_eq!(s.metrics.checksum_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_detected_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let d = cfg(dir.path(), "d0", 64 << 20);
    let s = ChunkStore::open(std::slice::from_ref(&d)).unwrap();
    write(&s, key(3, 0), 0, &pattern(8192, 1)).await.unwrap();
    s.close().await.unwrap();
    drop(s);
    // Flip a byte of block 1 in the data area.
    let geo = Geometry::for_size(64 << 20).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d.path)
        .unwrap();
    let off = geo.data_offset(0) + 4096 + 10;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], off).unwrap();
    let s = ChunkStore::open(&[d]).unwrap();
    assert_eq!(
        read(&s, key(3, 0), 0, 4096).await.unwrap(),
        pattern(8192, 1)[..4096].to_vec()
    );
    match read(&s, key(3, 0), 4096, 4096).await {
        Err(ExportError::Corrupt { offset }) => assert_eq!(offset, 4096),
        other => panic!("expected corruption, got {other:?}"),
    }
    // An unaligned write into the corrupt block must not launder it either.
    assert!(matches!(
        write(&s, key(3, 0), 4096 + 1, b"z").await,
        Err(ExportError::Corrupt { .. })
    ));
    assert_eq!(s.metrics.checksum_errors.load(Ordering::Relaxed), 2);
    // A full overwrite heals it.
    write(&s, key(3, 0), 4096, &pattern(4096, 2)).await.unwrap();
    assert_eq!(
        read(&s, key(3, 0), 4096, 4096).await.unwrap(),
        pattern(4096, 2).to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_punches_and_zero_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = cfg(dir.path(), "d0", 64 << 20);
    let s = ChunkStore::open(std::slice::from_ref(&d)).unwrap();
    let k = key(4, 0);
    write(&s, k, 0, &pattern(4 << 20, 3)).await.unwrap();
    s.flush().await.unwrap();
    let blocks_before = std::fs::metadata(&d.path).unwrap().blocks();
    // Trim 1 MiB plus partial blocks at both ends.
    s.zero(k, 4096 + 100, (1 << 20) + 4096, true, false, false)
        .await
        .unwrap();
    let got = read(&s, k, 0, 4 << 20).await.unwrap();
    let p = pattern(4 << 20, 3);
    let (a, b) = (4096 + 100, 4096 + 100 + (1 << 20) + 4096);
    assert_eq!(&got[..a], &p[..a]);
    assert!(got[a..b].iter().all(|&x| x == 0));
    assert_eq!(&got[b..], &p[b..]);
    let alloc = s.allocation(k, 0, 4 << 20);
    assert!(alloc.contains(&((1 << 20), false)), "{alloc:?}");
    s.flush().await.unwrap();
    let blocks_after = std::fs::metadata(&d.path).unwrap().blocks();
    assert!(
        blocks_after + 2000 <= blocks_before,
        "space given back: {blocks_before} -> {blocks_after}"
    );
    // Zero in place (NO_HOLE): reads zero, stays allocated.
    s.zero(k, 3 << 20, 8192, false, true, true).await.unwrap();
    assert!(read(&s, k, 3 << 20, 8192)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert_eq!(s.allocation(k, 3 << 20, 8192), vec![(8192, true)]);
    // Trim of a chunk never written: nothing to do, no allocation.
    s.zero(key(4, 7), 0, 4 << 20, true, false, false)
        .await
        .unwrap();
    assert_eq!(s.chunk_version(key(4, 7)), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_is_enospc_and_corrupts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(&[cfg(dir.path(), "d0", 16 << 20)]).unwrap();
    let slots = s.stats()[0].slots;
    let p = pattern(4096, 4);
    for i in 0..slots {
        write(&s, key(5, i), 0, &p).await.unwrap();
    }
    assert!(matches!(
        write(&s, key(5, slots), 0, &p).await,
        Err(ExportError::NoSpace)
    ));
    // Existing chunks still fine, further writes into allocated chunks still work.
    for i in 0..slots {
        assert_eq!(read(&s, key(5, i), 0, 4096).await.unwrap(), p.to_vec());
    }
    write(&s, key(5, 0), 8192, &p).await.unwrap();
    // Deleting a volume returns its slots.
    assert_eq!(s.delete_volume(5).await.unwrap(), slots);
    assert_eq!(s.stats()[0].free_slots, slots);
    assert!(s.volumes().is_empty());
    // A reused slot never shows the old volume's data.
    assert_eq!(read(&s, key(6, 0), 0, 4096).await.unwrap(), vec![0; 4096]);
    write(&s, key(6, 0), 8192, &p).await.unwrap();
    assert_eq!(read(&s, key(6, 0), 0, 4096).await.unwrap(), vec![0; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_volume_stays_deleted_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = [cfg(dir.path(), "d0", 32 << 20)];
    {
        let s = ChunkStore::open(&d).unwrap();
        write(&s, key(7, 0), 0, &pattern(4096, 1)).await.unwrap();
        write(&s, key(8, 0), 0, &pattern(4096, 2)).await.unwrap();
        s.flush().await.unwrap();
        s.delete_volume(7).await.unwrap();
        // no close: crash
    }
    let s = ChunkStore::open(&d).unwrap();
    assert_eq!(s.volumes().into_iter().collect::<Vec<_>>(), vec![8]);
    assert_eq!(
        read(&s, key(8, 0), 0, 4096).await.unwrap(),
        pattern(4096, 2).to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_writes_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(ChunkStore::open(&[cfg(dir.path(), "d0", 32 << 20)]).unwrap());
    let mut tasks = Vec::new();
    for t in 0..16u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let off = (i * 1000 + t as u64 * 333) % (60 * 4096);
                write(&s, key(9, 0), off, &pattern(5000, t)).await.unwrap();
                read(&s, key(9, 0), 0, 64 * 4096).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.metrics.checksum_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn refuses_foreign_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("not-ours");
    std::fs::write(&p, vec![0xab; 16 << 20]).unwrap();
    let err = ChunkStore::open(&[DiskConfig {
        path: p.clone(),
        size: None,
    }])
    .err()
    .unwrap();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap()[0], 0xab);
    let missing = ChunkStore::open(&[DiskConfig {
        path: dir.path().join("nope"),
        size: None,
    }])
    .err()
    .unwrap();
    assert!(missing.to_string().contains("give a size"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_damage_and_repair_restores_only_matching_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = cfg(dir.path(), "d0", 64 << 20);
    let s = ChunkStore::open(std::slice::from_ref(&d)).unwrap();
    let k = key(5, 1);
    let data = pattern(16384, 9);
    write(&s, k, 0, &data).await.unwrap();
    s.flush().await.unwrap();
    let v0 = s.chunk_version(k).unwrap();
    let clean = s.scrub_blocks(k, 0, 1024).await.unwrap();
    assert_eq!(clean.bytes, 16384, "only written blocks are checked");
    assert!(clean.bad.is_empty());
    // Damage block 2 on disk, the way a bad sector or a stray write would.
    let (path, off) = s.locate(k).unwrap();
    assert_eq!(path, d.path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = off + 2 * 4096 + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    f.sync_all().unwrap();
    let rep = s.scrub_blocks(k, 0, 1024).await.unwrap();
    assert_eq!(rep.bad, vec![2]);
    // A read of the block fails and queues the chunk for repair.
    assert!(matches!(
        read(&s, k, 2 * 4096, 4096).await,
        Err(ExportError::Corrupt { .. })
    ));
    assert_eq!(s.take_suspects(), vec![k]);
    assert!(s.take_suspects().is_empty());
    // Data that is not what this copy acknowledged is refused.
    let other = pattern(4096, 1);
    assert_eq!(
        s.repair_block(k, 2, &other).await.unwrap(),
        RepairOutcome::Mismatch
    );
    assert_eq!(
        s.repair_block(k, 2, &data[2 * 4096..3 * 4096])
            .await
            .unwrap(),
        RepairOutcome::Repaired
    );
    assert_eq!(
        s.repair_block(k, 2, &data[2 * 4096..3 * 4096])
            .await
            .unwrap(),
        RepairOutcome::AlreadyGood
    );
    assert_eq!(
        s.repair_block(k, 100, &other).await.unwrap(),
        RepairOutcome::Gone
    );
    assert_eq!(read(&s, k, 0, 16384).await.unwrap(), data.to_vec());
    assert_eq!(s.chunk_version(k), Some(v0), "a repair is not a write");
    assert!(s.scrub_blocks(k, 0, 1024).await.unwrap().bad.is_empty());
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_full_ratio_no_new_chunk_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(&[cfg(dir.path(), "d0", 64 << 20)]).unwrap();
    let slots = s.stats()[0].slots;
    assert!(slots >= 4, "{slots}");
    s.set_full_ratio(0.5);
    let p = pattern(4096, 6);
    let mut taken = 0;
    while write(&s, key(8, taken), 0, &p).await.is_ok() {
        taken += 1;
        assert!(taken <= slots);
    }
    assert_eq!(taken, slots / 2, "half of {slots} slots");
    assert!(s.is_full());
    assert!(matches!(
        write(&s, key(8, taken), 0, &p).await,
        Err(ExportError::NoSpace)
    ));
    assert!(s.metrics.nospace_errors.load(Ordering::Relaxed) >= 2);
    // Chunks already here still take writes and read back; nothing else changed.
    write(&s, key(8, 0), 4096, &p).await.unwrap();
    for i in 0..taken {
        assert_eq!(read(&s, key(8, i), 0, 4096).await.unwrap(), p.to_vec());
    }
    assert_eq!(
        read(&s, key(8, taken), 0, 4096).await.unwrap(),
        vec![0u8; 4096]
    );
    // Back under the ratio: new chunks again.
    s.set_full_ratio(1.0);
    write(&s, key(8, taken), 0, &p).await.unwrap();
}
