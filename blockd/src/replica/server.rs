//! The replica side of the protocol over TCP: serves a host's chunk store to the gateways of
//! other hosts. Peers must prove the cluster secret first; requests run concurrently and
//! replies go back in completion order. What each request does (and the epoch fencing) is
//! `ReplicaService`, shared with the gateway's path to its own disks.

use super::auth;
use super::conn::{read_frame, write_frame};
use super::service::{ReplicaService, EINVAL, EPERM};
use super::wire::{Frame, Message};
use crate::buf::AlignedBuf;
use crate::uring::Buf;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

pub use super::service::ESTALE;

pub struct ReplicaServer {
    pub service: Arc<ReplicaService>,
    pub secret: Vec<u8>,
    pub cluster_id: String,
    pub node: String,
}

impl ReplicaServer {
    async fn handle(&self, f: Frame) -> (Message, Vec<u8>) {
        let reply = |status: u32, version: u64| Message::Reply { status, version };
        let status = |r: Result<u64, u32>| match r {
            Ok(v) => (reply(0, v), vec![]),
            Err(e) => (reply(e, 0), vec![]),
        };
        let svc = &self.service;
        match f.msg {
            Message::Read {
                chunk,
                offset,
                len,
                epoch,
            } => {
                if len > super::wire::MAX_PAYLOAD {
                    return (reply(EINVAL, 0), vec![]);
                }
                let buf = AlignedBuf::for_overwrite(len as usize);
                let (b, r) = svc.read_into(chunk, offset, len, epoch, buf, 0).await;
                match r {
                    Ok(v) => (reply(0, v), b.to_vec()),
                    Err(e) => (reply(e, 0), vec![]),
                }
            }
            Message::Write {
                chunk,
                offset,
                epoch,
                version,
                fua,
            } => {
                let len = f.payload.len();
                status(
                    svc.write(
                        chunk,
                        offset,
                        Buf::Aligned(AlignedBuf::from_slice(&f.payload)),
                        0,
                        len,
                        epoch,
                        version,
                        fua,
                    )
                    .await,
                )
            }
            Message::Zero {
                chunk,
                offset,
                len,
                epoch,
                version,
                punch,
                fua,
            } => status(
                svc.zero(chunk, offset, len, epoch, version, punch, fua)
                    .await,
            ),
            Message::Flush { volume, epoch } => status(
                svc.flush((volume != 0).then_some(volume), epoch)
                    .await
                    .map(|()| 0),
            ),
            Message::Versions {
                volume,
                start,
                epoch,
            } => match svc.versions(volume, start, epoch) {
                Ok((entries, next)) => (Message::VersionList { entries, next }, vec![]),
                Err(e) => (reply(e, 0), vec![]),
            },
            Message::Checksums { chunk } => {
                let (version, crcs) = svc.checksums(chunk);
                (
                    reply(0, version),
                    crcs.iter().flat_map(|c| c.to_le_bytes()).collect(),
                )
            }
            Message::Fetch { chunk, epoch } => match svc.fetch(chunk, epoch).await {
                Ok((v, image)) => (reply(0, v), image),
                Err(e) => (reply(e, 0), vec![]),
            },
            Message::Install {
                chunk,
                epoch,
                version,
            } => status(
                svc.install(chunk, epoch, version, &f.payload)
                    .await
                    .map(|()| version),
            ),
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
