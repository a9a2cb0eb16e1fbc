//! The gateway side: one authenticated, pipelined connection to a replica. Requests are
//! tagged with ids; a reader task hands each reply to whoever waits for it, so many requests
//! share one connection in flight.

use super::auth;
use super::conn::{read_frame, write_frame};
use super::wire::{self, Chunk, ChunkState, Frame, Message};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

/// Why a request to a replica failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The replica is unreachable, timed out, or broke the protocol: treat it as failed.
    #[error("replica down: {0}")]
    Down(String),
    /// The replica answered with an errno (`service::ESTALE`: the sender's epoch is fenced).
    #[error("replica answered errno {0}")]
    Status(u32),
}

fn down(e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Down(e.to_string())
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Frame>>>>>;

pub struct ReplicaClient {
    w: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    /// Longest wait for any answer; a request that takes longer fails the connection.
    timeout: Duration,
}

fn denied(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.to_string())
}

impl ReplicaClient {
    /// Connects and authenticates (both directions) with the cluster secret.
    pub async fn connect(
        addr: &str,
        cluster_id: &str,
        node: &str,
        secret: &[u8],
    ) -> io::Result<ReplicaClient> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        // Closing this connection aborts it (RST) and drops whatever is still queued to send.
        // A graceful close would let TCP deliver requests the gateway already gave up on (a
        // write that timed out during a network cut) once the link is back — after the replica
        // may have been resynced, overwriting newer data with the stale write.
        // (Deprecated because a non-zero linger blocks the closing thread; zero never does.)
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
        let (r, mut w) = s.into_split();
        let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
        let my_nonce = auth::nonce();
        write_frame(
            &mut w,
            0,
            &Message::Hello {
                cluster_id: cluster_id.to_string(),
                node: node.to_string(),
                nonce: my_nonce,
            },
            &[],
        )
        .await?;
        let hello = read_frame(&mut r).await?;
        let server_nonce = match hello.msg {
            Message::Hello { nonce, .. } => nonce,
            Message::Reply { .. } => return Err(denied("replica refused the cluster id")),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "expected Hello")),
        };
        match read_frame(&mut r).await?.msg {
            Message::Auth { mac } if auth::verify(secret, "server", &my_nonce, &mac) => {}
            _ => return Err(denied("replica failed to prove the cluster secret")),
        }
        write_frame(
            &mut w,
            0,
            &Message::Auth {
                mac: auth::prove(secret, "client", &server_nonce),
            },
            &[],
        )
        .await?;
        match read_frame(&mut r).await?.msg {
            Message::Reply { status: 0, .. } => {}
            _ => return Err(denied("replica refused our proof of the cluster secret")),
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let p2 = pending.clone();
        let reader = tokio::spawn(async move {
            while let Ok(f) = read_frame(&mut r).await {
                let tx = p2.lock().unwrap().as_mut().and_then(|m| m.remove(&f.id));
                if let Some(tx) = tx {
                    let _ = tx.send(f);
                }
            }
            // Connection gone: fail everyone waiting, refuse new requests.
            p2.lock().unwrap().take();
        });
        Ok(ReplicaClient {
            w: tokio::sync::Mutex::new(w),
            pending,
            next: AtomicU64::new(1),
            reader,
            timeout: Duration::from_secs(3600),
        })
    }

    /// Connects (within `timeout`) and sets `timeout` as the limit for every request.
    pub async fn connect_timeout(
        addr: &str,
        cluster_id: &str,
        node: &str,
        secret: &[u8],
        timeout: Duration,
    ) -> io::Result<ReplicaClient> {
        let mut c = tokio::time::timeout(timeout, Self::connect(addr, cluster_id, node, secret))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"))??;
        c.timeout = timeout;
        Ok(c)
    }

    /// Whether the connection is gone (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.pending.lock().unwrap().is_none()
    }

    /// Fails the connection: waiting requests and later ones get an error at once.
    pub fn close(&self) {
        self.pending.lock().unwrap().take();
        self.reader.abort();
    }

    /// One request with the connection's timeout; any failure but an errno answer closes
    /// the connection.
    async fn call(&self, msg: &Message, payload: &[u8]) -> Result<Frame, ReplicaError> {
        match tokio::time::timeout(self.timeout, self.request(msg, payload)).await {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => {
                self.close();
                Err(down(e))
            }
            Err(_) => {
                self.close();
                Err(down(format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    /// A request answered by `Reply`: the version on success, the errno otherwise.
    async fn status(&self, msg: &Message, payload: &[u8]) -> Result<(u64, Vec<u8>), ReplicaError> {
        let f = self.call(msg, payload).await?;
        match f.msg {
            Message::Reply { status: 0, version } => Ok((version, f.payload)),
            Message::Reply { status, .. } => Err(ReplicaError::Status(status)),
            _ => {
                self.close();
                Err(down("unexpected answer"))
            }
        }
    }

    pub async fn read(
        &self,
        chunk: Chunk,
        offset: u32,
        len: u32,
        epoch: u64,
    ) -> Result<(u64, Vec<u8>), ReplicaError> {
        let (v, data) = self
            .status(
                &Message::Read {
                    chunk,
                    offset,
                    len,
                    epoch,
                },
                &[],
            )
            .await?;
        if data.len() != len as usize {
            self.close();
            return Err(down("short read answer"));
        }
        Ok((v, data))
    }

    pub async fn write(
        &self,
        chunk: Chunk,
        offset: u32,
        data: &[u8],
        epoch: u64,
        version: u64,
        fua: bool,
    ) -> Result<u64, ReplicaError> {
        self.status(
            &Message::Write {
                chunk,
                offset,
                epoch,
                version,
                fua,
            },
            data,
        )
        .await
        .map(|r| r.0)
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
    ) -> Result<u64, ReplicaError> {
        self.status(
            &Message::Zero {
                chunk,
                offset,
                len,
                epoch,
                version,
                punch,
                fua,
            },
            &[],
        )
        .await
        .map(|r| r.0)
    }

    pub async fn flush(&self, volume: u64, epoch: u64) -> Result<(), ReplicaError> {
        self.status(&Message::Flush { volume, epoch }, &[])
            .await
            .map(|_| ())
    }

    /// Every chunk state of a volume held there (all pages).
    pub async fn versions(&self, volume: u64, epoch: u64) -> Result<Vec<ChunkState>, ReplicaError> {
        let mut out = Vec::new();
        let mut start = 0u64;
        loop {
            let f = self
                .call(
                    &Message::Versions {
                        volume,
                        start,
                        epoch,
                    },
                    &[],
                )
                .await?;
            match f.msg {
                Message::VersionList { entries, next } => {
                    out.extend(entries);
                    if next == wire::END || next <= start {
                        return Ok(out);
                    }
                    start = next;
                }
                Message::Reply { status, .. } if status != 0 => {
                    return Err(ReplicaError::Status(status))
                }
                _ => {
                    self.close();
                    return Err(down("unexpected answer to versions"));
                }
            }
        }
    }

    /// Version and per-block crc32s of a chunk (empty when not stored there).
    pub async fn checksums(&self, chunk: Chunk) -> Result<(u64, Vec<u32>), ReplicaError> {
        let (v, p) = self.status(&Message::Checksums { chunk }, &[]).await?;
        if p.len() % 4 != 0 {
            self.close();
            return Err(down("bad checksums answer"));
        }
        Ok((
            v,
            p.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    /// A chunk image and its version.
    pub async fn fetch(&self, chunk: Chunk, epoch: u64) -> Result<(u64, Vec<u8>), ReplicaError> {
        let (v, p) = self.status(&Message::Fetch { chunk, epoch }, &[]).await?;
        if wire::parse_image(&p).is_err() {
            self.close();
            return Err(down("bad chunk image"));
        }
        Ok((v, p))
    }

    pub async fn install(
        &self,
        chunk: Chunk,
        epoch: u64,
        version: u64,
        image: &[u8],
    ) -> Result<(), ReplicaError> {
        self.status(
            &Message::Install {
                chunk,
                epoch,
                version,
            },
            image,
        )
        .await
        .map(|_| ())
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&self, msg: &Message, payload: &[u8]) -> io::Result<Frame> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(m) => m.insert(id, tx),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "replica connection closed",
                ))
            }
        };
        {
            let mut w = self.w.lock().await;
            if let Err(e) = write_frame(&mut *w, id, msg, payload).await {
                if let Some(m) = self.pending.lock().unwrap().as_mut() {
                    m.remove(&id);
                }
                return Err(e);
            }
        }
        rx.await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "replica connection closed"))
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
