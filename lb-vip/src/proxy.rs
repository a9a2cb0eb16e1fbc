//! The TCP proxy: one accept loop per VIP listener, one task per connection.
//!
//! A connection: pick a backend ([`Vip::choose`]: persistence, then the VIP's scheduler over
//! healthy, active backends below their limit), connect with a short timeout; a refused or
//! timed-out connect marks that backend down at once (passive check) and the connection is
//! retried on another backend, up to [`MAX_ATTEMPTS`], so the client sees no failure. Then an
//! optional PROXY v2 header and the byte copy both ways, until either side ends or the
//! backend's drain deadline (drained or removed backend) passes.
//!
//! Copying is `tokio::io::copy_bidirectional_with_sizes` with 16 KiB buffers per direction
//! (HAProxy's `tune.bufsize`). Measured on this 2-core VM (release build, loopback, iperf3
//! one stream, 4 s, other builds running, so ±15%): direct 15-17 Gbit/s; through lb-vip with
//! tokio's default 8 KiB buffers 4.6, 16 KiB 7.6, 32 KiB 7.2, 64 KiB 8.6 Gbit/s (4 streams:
//! 11.7-12.5 with 16-64 KiB). Buffers cost memory per connection (2 × 16 KiB), so 16 KiB is
//! the knee. splice(2) through a pipe would save the two user-space copies per chunk and
//! might close much of the remaining bulk gap (not measured), at the price of a pipe (two fds) per
//! connection and two syscalls per chunk; for the short request/response connections of
//! the new-connection benchmark the copy is not where the time goes (accept, connect, the
//! scheduler lock), so splice would pay only for bulk transfers. Not implemented yet.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::daemon::{Backend, Vip};
use crate::metrics::BackendStats;
use crate::sched::Proto;

/// Copy buffer per direction (see the module comment for the measurements).
const COPY_BUF: usize = 16 * 1024;

/// Backends tried for one client connection before giving up.
pub const MAX_ATTEMPTS: usize = 4;

/// A listening socket for a VIP, with SO_REUSEADDR (a restarted lb-vip binds at once).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

/// Accepts connections for `vip` until the task is aborted.
pub async fn serve(vip: Arc<Vip>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                BackendStats::add(&vip.stats.accepted, 1);
                tokio::spawn(handle(vip.clone(), client, peer));
            }
            Err(e) => {
                BackendStats::add(&vip.stats.socket_errors, 1);
                tracing::debug!(vip = %vip.name, error = %e, "accept failed");
                // EMFILE and friends: do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Releases the backend's connection slot when the connection ends (however it ends).
struct Slot {
    vip: Arc<Vip>,
    backend: Arc<Backend>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.vip.release(&self.backend);
    }
}

/// Connects to a backend chosen for `peer`, retrying on others after passive failures.
async fn connect(vip: &Arc<Vip>, peer: SocketAddr) -> Option<(Slot, TcpStream)> {
    for attempt in 0..MAX_ATTEMPTS {
        let backend = vip.choose(peer)?;
        let slot = Slot {
            vip: vip.clone(),
            backend,
        };
        let addr = slot.backend.addr;
        let err = match vip.connect_backend(addr).await {
            Ok(s) => return Some((slot, s)),
            Err(e) => e.to_string(),
        };
        BackendStats::add(&slot.backend.stats.errors, 1);
        vip.passive_fail(&slot.backend, err);
        drop(slot);
        if attempt + 1 < MAX_ATTEMPTS {
            BackendStats::add(&vip.stats.retries, 1);
        }
    }
    None
}

async fn handle(vip: Arc<Vip>, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let Some((slot, mut upstream)) = connect(&vip, peer).await else {
        BackendStats::add(&vip.stats.no_backend, 1);
        tracing::debug!(vip = %vip.name, %peer, "no backend could take the connection");
        return;
    };
    let _ = upstream.set_nodelay(true);
    let stats = slot.backend.stats.clone();
    if vip.proxy_protocol() {
        let local = client.local_addr().unwrap_or(vip.addr);
        let hdr = crate::proxy_v2::encode(peer, local, Proto::Tcp);
        if upstream.write_all(&hdr).await.is_err() {
            return;
        }
    }
    let mut close_rx = slot.backend.close_rx();
    let mut c = Counted {
        s: client,
        n: &stats.bytes_in,
    };
    let mut u = Counted {
        s: upstream,
        n: &stats.bytes_out,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, COPY_BUF, COPY_BUF);
    tokio::pin!(copy);
    let mut watching = true;
    loop {
        let deadline = *close_rx.borrow_and_update();
        tokio::select! {
            _ = &mut copy => break,
            r = close_rx.changed(), if watching => {
                if r.is_err() {
                    watching = false;
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                BackendStats::add(&stats.drain_closed, 1);
                tracing::debug!(vip = %vip.name, backend = %slot.backend.name, "drain over: closing connection");
                break;
            }
        }
    }
}

/// A stream that counts the bytes read from it.
struct Counted<'a> {
    s: TcpStream,
    n: &'a AtomicU64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.s).poll_read(cx, buf);
        let got = buf.filled().len().saturating_sub(before);
        if got > 0 {
            BackendStats::add(self.n, got as u64);
        }
        r
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.s).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.s).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.s).poll_shutdown(cx)
    }
}
