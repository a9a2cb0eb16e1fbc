//! The replica protocol over real TCP against a real chunk store: authentication both ways,
//! pipelined reads and writes, versions and checksums, fencing of stale epochs, and a peer
//! that sends garbage is cut off without disturbing others.

use blockd::chunkstore::{ChunkStore, DiskConfig};
use blockd::replica::client::ReplicaClient;
use blockd::replica::server::{ReplicaServer, ESTALE};
use blockd::replica::service::ReplicaService;
use blockd::replica::wire::{self, Chunk, Message};
use std::sync::Arc;

const SECRET: &[u8] = b"cluster-secret";

async fn server(dir: &std::path::Path) -> String {
    let store = Arc::new(
        ChunkStore::open(&[DiskConfig {
            path: dir.join("d0"),
            size: Some(64 << 20),
        }])
        .unwrap(),
    );
    let srv = Arc::new(ReplicaServer {
        service: Arc::new(ReplicaService::new(store)),
        secret: SECRET.to_vec(),
        cluster_id: "c1".into(),
        node: "r1".into(),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(srv.serve(l));
    addr
}

fn reply(m: &Message) -> (u32, u64) {
    match m {
        Message::Reply { status, version } => (*status, *version),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_pipelined_io_with_fencing() {
    let dir = tempfile::tempdir().unwrap();
    let addr = server(dir.path()).await;
    // Wrong secret, wrong cluster: refused.
    let e = ReplicaClient::connect(&addr, "c1", "g", b"wrong")
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let e = ReplicaClient::connect(&addr, "c2", "g", SECRET)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");

    let c = Arc::new(
        ReplicaClient::connect(&addr, "c1", "gw1", SECRET)
            .await
            .unwrap(),
    );
    let chunk = Chunk {
        volume: 7,
        index: 3,
    };
    let data = vec![0x5au8; 64 << 10];
    let f = c
        .request(
            &Message::Write {
                chunk,
                offset: 4096,
                epoch: 2,
                version: 5,
                fua: false,
            },
            &data,
        )
        .await
        .unwrap();
    // The chunk takes the gateway's version (and never goes back: max of what it saw).
    let (st, v1) = reply(&f.msg);
    assert_eq!(st, 0);
    assert_eq!(v1, 5);
    let f = c
        .request(
            &Message::Read {
                chunk,
                offset: 4096,
                len: 65536,
                epoch: 2,
            },
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply(&f.msg).0, 0);
    assert!(f.payload == data, "read back differs");
    // Many requests in flight on one connection.
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let ch = Chunk {
                volume: 7,
                index: 10 + (i % 4) as u64,
            };
            let d = vec![i as u8; 4096];
            let f = c
                .request(
                    &Message::Write {
                        chunk: ch,
                        offset: 8192 * (i / 4 + 1),
                        epoch: 2,
                        version: 0,
                        fua: false,
                    },
                    &d,
                )
                .await
                .unwrap();
            assert_eq!(reply(&f.msg).0, 0);
            let f = c
                .request(
                    &Message::Read {
                        chunk: ch,
                        offset: 8192 * (i / 4 + 1),
                        len: 4096,
                        epoch: 2,
                    },
                    &[],
                )
                .await
                .unwrap();
            assert!(f.payload == d, "pipelined read {i} returned other data");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        reply(
            &c.request(
                &Message::Flush {
                    volume: 7,
                    epoch: 2
                },
                &[]
            )
            .await
            .unwrap()
            .msg
        )
        .0,
        0
    );
    // Versions and checksums for resync.
    let f = c
        .request(
            &Message::Versions {
                volume: 7,
                start: 0,
                epoch: 0,
            },
            &[],
        )
        .await
        .unwrap();
    let Message::VersionList { entries, next } = f.msg else {
        panic!("{:?}", f.msg)
    };
    assert_eq!(next, wire::END);
    assert_eq!(
        entries.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![3, 10, 11, 12, 13]
    );
    // Paging from an index on.
    let all = c.versions(7, 0).await.unwrap();
    assert_eq!(all, entries);
    let f = c.request(&Message::Checksums { chunk }, &[]).await.unwrap();
    assert_eq!(f.payload.len(), 1024 * 4);
    let crc1 = u32::from_le_bytes(f.payload[4..8].try_into().unwrap());
    assert_eq!(crc1, crc32fast::hash(&data[..4096]));
    let f = c
        .request(&Message::Fetch { chunk, epoch: 2 }, &[])
        .await
        .unwrap();
    // A chunk image: the bitmap, then only the written blocks (here 16 of them at block 1).
    let (bm, blocks) = wire::parse_image(&f.payload).unwrap();
    assert!(!wire::bit(&bm, 0) && wire::bit(&bm, 1) && wire::bit(&bm, 16));
    assert!(blocks[..65536] == data[..], "fetched chunk differs");
    // Installing that image elsewhere (another chunk) reproduces the same state.
    let other = Chunk {
        volume: 7,
        index: 99,
    };
    c.install(other, 2, 1234, &f.payload).await.unwrap();
    let st = c.versions(7, 0).await.unwrap();
    let a = st.iter().find(|e| e.index == chunk.index).unwrap();
    let b = st.iter().find(|e| e.index == 99).unwrap();
    assert_eq!(b.version, 1234);
    assert_eq!(a.digest, b.digest, "installed copy differs from its source");
    // A newer epoch fences the older one, for writes and reads.
    let f = c
        .request(
            &Message::Write {
                chunk,
                offset: 0,
                epoch: 3,
                version: 0,
                fua: true,
            },
            &[1u8; 512],
        )
        .await
        .unwrap();
    assert_eq!(reply(&f.msg).0, 0);
    let f = c
        .request(
            &Message::Write {
                chunk,
                offset: 0,
                epoch: 2,
                version: 0,
                fua: false,
            },
            &[2u8; 512],
        )
        .await
        .unwrap();
    assert_eq!(reply(&f.msg).0, ESTALE);
    let f = c
        .request(
            &Message::Read {
                chunk,
                offset: 0,
                len: 512,
                epoch: 2,
            },
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply(&f.msg).0, ESTALE);
    let f = c
        .request(
            &Message::Read {
                chunk,
                offset: 0,
                len: 512,
                epoch: 3,
            },
            &[],
        )
        .await
        .unwrap();
    assert!(
        f.payload == vec![1u8; 512],
        "the fenced write left nothing behind"
    );
    // Out-of-chunk ranges are refused.
    let f = c
        .request(
            &Message::Read {
                chunk,
                offset: (4 << 20) - 10,
                len: 20,
                epoch: 3,
            },
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply(&f.msg).0, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let addr = server(dir.path()).await;
    let good = ReplicaClient::connect(&addr, "c1", "gw", SECRET)
        .await
        .unwrap();
    let mut bad = tokio::net::TcpStream::connect(&addr).await.unwrap();
    bad.write_all(&[0xffu8; 64]).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), bad.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "server closes a connection that sends garbage");
    let f = good
        .request(
            &Message::Flush {
                volume: 0,
                epoch: 1,
            },
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply(&f.msg).0, 0);
}

/// A write older than the image a resync installed (a request that arrives late, e.g. resent
/// by TCP from a connection the gateway gave up during a network cut) is refused and leaves
/// the copied data alone; newer writes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_write_after_a_resync_install_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let addr = server(dir.path()).await;
    let c = ReplicaClient::connect(&addr, "c1", "gw1", SECRET)
        .await
        .unwrap();
    let chunk = Chunk {
        volume: 9,
        index: 1,
    };
    let old = vec![0x11u8; 8192];
    let new = vec![0x22u8; 8192];
    // The source replica's image: `new` at offset 0, version 30.
    let src_dir = tempfile::tempdir().unwrap();
    let src_addr = server(src_dir.path()).await;
    let src = ReplicaClient::connect(&src_addr, "c1", "gw1", SECRET)
        .await
        .unwrap();
    assert_eq!(src.write(chunk, 0, &new, 1, 30, false).await.unwrap(), 30);
    let (v, image) = src.fetch(chunk, 1).await.unwrap();
    assert_eq!(v, 30);
    c.install(chunk, 1, v, &image).await.unwrap();
    // The late write #20 (issued before the copy): refused, data unchanged.
    let e = c.write(chunk, 0, &old, 1, 20, false).await.unwrap_err();
    assert_eq!(e, blockd::replica::client::ReplicaError::Status(5));
    let e = c
        .zero(chunk, 0, 4096, 1, 21, false, false)
        .await
        .unwrap_err();
    assert_eq!(e, blockd::replica::client::ReplicaError::Status(5));
    let (_, got) = c.read(chunk, 0, 8192, 1).await.unwrap();
    assert!(got == new, "stale write overwrote the resynced copy");
    // A write issued after the copy (higher version) applies.
    assert_eq!(c.write(chunk, 0, &old, 1, 31, false).await.unwrap(), 31);
    let (_, got) = c.read(chunk, 0, 8192, 1).await.unwrap();
    assert!(got == old);
}
