//! The chunk store on a real block device (a loop device over a sparse file): formatted,
//! written through io_uring with O_DIRECT, trimmed, closed, reopened and read back.

use blockd::buf::AlignedBuf;
use blockd::chunkstore::layout::ChunkKey;
use blockd::chunkstore::{ChunkStore, DiskConfig};
use blockd::uring::Buf;
use std::process::Command;

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn chunk_store_on_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&backing)
        .output()
        .expect("losetup (util-linux) is installed");
    assert!(
        out.status.success(),
        "losetup failed (needs root and /dev/loop-control): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let cfg = [DiskConfig {
        path: dev.0.clone().into(),
        size: None,
    }];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let key = ChunkKey {
        volume: 1,
        index: 2,
    };
    rt.block_on(async {
        let s = ChunkStore::open(&cfg).unwrap();
        let st = &s.stats()[0];
        assert_eq!(st.slots, 15, "64 MiB device: 15 slots");
        s.write(
            key,
            4096,
            Buf::Aligned(AlignedBuf::from_slice(&data)),
            0,
            data.len(),
            true,
        )
        .await
        .unwrap();
        s.zero(key, 4096, 8192, true, false, false).await.unwrap();
        s.close().await.unwrap();
    });
    rt.block_on(async {
        let s = ChunkStore::open(&cfg).unwrap();
        let (b, r) = s
            .read_into(key, 4096, AlignedBuf::zeroed(data.len()), 0, data.len())
            .await;
        r.unwrap();
        assert!(
            b[..8192].iter().all(|&x| x == 0),
            "trimmed range reads zero"
        );
        assert_eq!(&b[8192..], &data[8192..]);
        assert_eq!(
            s.metrics
                .restamped_blocks
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        s.close().await.unwrap();
    });
}
