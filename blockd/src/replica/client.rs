//! The gateway side: one authenticated, pipelined connection to a replica. Requests are
//! tagged with ids; a reader task hands each reply to whoever waits for it, so many requests
//! share one connection in flight.

use super::auth;
use super::conn::{read_frame, write_frame};
use super::wire::{Frame, Message};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Frame>>>>>;

pub struct ReplicaClient {
    w: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
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
        })
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
