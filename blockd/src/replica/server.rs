//! The replica side of the protocol: serves a host's chunk store to the gateways of other
//! hosts. Peers must prove the cluster secret first; requests run concurrently and replies go
//! back in completion order; I/O that carries a lease epoch older than the newest one seen for
//! that volume is refused with ESTALE (fencing of a gateway that lost its lease).
//!
//! Groundwork for issue 3: fences are kept in memory only so far (they must become durable),
//! and blockd does not start this server yet.

use super::auth;
use super::conn::{read_frame, write_frame};
use super::wire::{Chunk, Frame, Message};
use crate::buf::AlignedBuf;
use crate::chunkstore::layout::{ChunkKey, SLOT_SIZE};
use crate::chunkstore::ChunkStore;
use crate::uring::Buf;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

pub const ESTALE: u32 = 116;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;

/// Highest lease epoch seen per volume.
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
}

pub struct ReplicaServer {
    pub store: Arc<ChunkStore>,
    pub secret: Vec<u8>,
    pub cluster_id: String,
    pub node: String,
    pub fences: Fences,
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

impl ReplicaServer {
    async fn handle(&self, f: Frame) -> (Message, Vec<u8>) {
        let reply = |status: u32, version: u64| Message::Reply { status, version };
        match f.msg {
            Message::Read {
                chunk,
                offset,
                len,
                epoch,
            } => {
                if !self.fences.admit(chunk.volume, epoch) {
                    return (reply(ESTALE, 0), vec![]);
                }
                if !in_chunk(offset, len as usize) || len > super::wire::MAX_PAYLOAD {
                    return (reply(EINVAL, 0), vec![]);
                }
                let (b, r) = self
                    .store
                    .read_into(
                        key(chunk),
                        offset as u64,
                        AlignedBuf::for_overwrite(len as usize),
                        0,
                        len as usize,
                    )
                    .await;
                let version = self.store.chunk_version(key(chunk)).unwrap_or(0);
                match r {
                    Ok(()) => (reply(0, version), b.to_vec()),
                    Err(e) => (reply(e.nbd_errno(), version), vec![]),
                }
            }
            Message::Write {
                chunk,
                offset,
                epoch,
                fua,
                ..
            } => {
                if !self.fences.admit(chunk.volume, epoch) {
                    return (reply(ESTALE, 0), vec![]);
                }
                if f.payload.is_empty() || !in_chunk(offset, f.payload.len()) {
                    return (reply(EINVAL, 0), vec![]);
                }
                let len = f.payload.len();
                let r = self
                    .store
                    .write(
                        key(chunk),
                        offset as u64,
                        Buf::Aligned(AlignedBuf::from_slice(&f.payload)),
                        0,
                        len,
                        fua,
                    )
                    .await;
                let version = self.store.chunk_version(key(chunk)).unwrap_or(0);
                match r {
                    Ok(()) => (reply(0, version), vec![]),
                    Err(e) => (reply(e.nbd_errno(), version), vec![]),
                }
            }
            Message::Flush { .. } => match self.store.flush().await {
                Ok(()) => (reply(0, 0), vec![]),
                Err(e) => (reply(e.nbd_errno(), 0), vec![]),
            },
            Message::Versions { volume } => (
                Message::VersionList {
                    entries: self.store.chunk_versions(volume),
                },
                vec![],
            ),
            Message::Checksums { chunk } => match self.store.chunk_checksums(key(chunk)) {
                Some((version, crcs)) => (
                    reply(0, version),
                    crcs.iter().flat_map(|c| c.to_le_bytes()).collect(),
                ),
                None => (reply(0, 0), vec![]),
            },
            Message::Fetch { chunk, epoch } => {
                if !self.fences.admit(chunk.volume, epoch) {
                    return (reply(ESTALE, 0), vec![]);
                }
                let n = SLOT_SIZE as usize;
                let (b, r) = self
                    .store
                    .read_into(key(chunk), 0, AlignedBuf::for_overwrite(n), 0, n)
                    .await;
                let version = self.store.chunk_version(key(chunk)).unwrap_or(0);
                match r {
                    Ok(()) => (reply(0, version), b.to_vec()),
                    Err(e) => (reply(e.nbd_errno(), version), vec![]),
                }
            }
            _ => (reply(EINVAL, 0), vec![]),
        }
    }

    /// Serves one peer connection: authentication, then requests until the peer leaves.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
    ) -> io::Result<()> {
        let _ = stream.set_nodelay(true);
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::with_capacity(64 << 10, r);
        // Handshake: the client speaks first.
        let hello = read_frame(&mut r).await?;
        let Message::Hello {
            cluster_id,
            nonce: client_nonce,
            ..
        } = hello.msg
        else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "expected Hello"));
        };
        if cluster_id != self.cluster_id {
            write_frame(
                &mut w,
                0,
                &Message::Reply {
                    status: EPERM,
                    version: 0,
                },
                &[],
            )
            .await?;
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "peer from another cluster",
            ));
        }
        let my_nonce = auth::nonce();
        write_frame(
            &mut w,
            0,
            &Message::Hello {
                cluster_id: self.cluster_id.clone(),
                node: self.node.clone(),
                nonce: my_nonce,
            },
            &[],
        )
        .await?;
        write_frame(
            &mut w,
            0,
            &Message::Auth {
                mac: auth::prove(&self.secret, "server", &client_nonce),
            },
            &[],
        )
        .await?;
        let proof = read_frame(&mut r).await?;
        let ok = matches!(proof.msg, Message::Auth { mac } if auth::verify(&self.secret, "client", &my_nonce, &mac));
        write_frame(
            &mut w,
            0,
            &Message::Reply {
                status: if ok { 0 } else { EPERM },
                version: 0,
            },
            &[],
        )
        .await?;
        if !ok {
            tracing::warn!("replica peer failed authentication");
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "bad cluster secret",
            ));
        }
        // Requests.
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Message, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((id, m, p)) = rx.recv().await {
                if write_frame(&mut w, id, &m, &p).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        let result = loop {
            let f = match read_frame(&mut r).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e),
            };
            let this = self.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let id = f.id;
                let (m, p) = this.handle(f).await;
                let _ = tx.send((id, m, p));
            });
        };
        drop(tx);
        let _ = writer.await;
        result
    }

    /// Accepts peers until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            match listener.accept().await {
                Ok((s, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.serve_connection(s).await {
                            tracing::debug!(%peer, error = %e, "replica connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replica accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}
