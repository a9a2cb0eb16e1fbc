//! The UDP proxy: a flow table keyed by the client's address. A client's first datagram picks
//! a backend ([`Vip::choose`]) and opens a socket connected to it; later datagrams follow the
//! flow; the backend's answers go back to the client from the VIP socket (so the client sees
//! the VIP as the source). A flow ends after the idle timeout (30 s by default), when its
//! backend goes down or is refused (ICMP port unreachable: passive check), or when its
//! backend's drain runs out. Datagrams are payload only: nothing is parsed, so no datagram
//! can be malformed for us; the receive buffer holds the largest UDP payload, and the flow
//! table is bounded ([`MAX_FLOWS`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::daemon::{Backend, Vip};
use crate::metrics::BackendStats;
use crate::sched::Proto;

/// Most flows one VIP keeps; datagrams of new clients beyond it are dropped.
pub const MAX_FLOWS: usize = 65_536;
/// Largest UDP payload (IPv4: 65535 − 20 − 8).
const MAX_DATAGRAM: usize = 65_535;

/// The VIP's socket. (No SO_REUSEADDR: for UDP it only matters with several sockets on one
/// port, which lb-vip never opens.)
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

struct Flow {
    sock: UdpSocket,
    backend: Arc<Backend>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last_ms: AtomicU64,
    stop: Notify,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

/// Serves `vip` on `sock` until the task is aborted.
pub async fn serve(vip: Arc<Vip>, sock: UdpSocket, idle: Duration) {
    let sock = Arc::new(sock);
    let flows: Flows = Arc::new(Mutex::new(HashMap::new()));
    let epoch = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(MAX_DATAGRAM + 64);
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                BackendStats::add(&vip.stats.socket_errors, 1);
                tracing::debug!(vip = %vip.name, error = %e, "UDP receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let now = epoch.elapsed().as_millis() as u64;
        let existing = flows.lock().unwrap().get(&peer).cloned();
        let flow = match existing {
            // A drained or removed backend keeps its flows until its drain runs out (the
            // flow task ends them); a backend that went down loses them at once.
            Some(f) if f.backend.is_up() => f,
            stale => {
                if let Some(f) = stale {
                    end_flow(&flows, peer, &f);
                }
                match new_flow(&vip, &sock, &flows, peer, idle, epoch).await {
                    Some(f) => f,
                    None => {
                        BackendStats::add(&vip.stats.udp_dropped, 1);
                        continue;
                    }
                }
            }
        };
        flow.last_ms.store(now, Ordering::Relaxed);
        let payload = if vip.proxy_protocol() {
            out.clear();
            let local = SocketAddr::new(vip.addr.ip(), vip.addr.port());
            crate::proxy_v2::encode_into(&mut out, peer, local, Proto::Udp);
            out.extend_from_slice(&buf[..n]);
            &out[..]
        } else {
            &buf[..n]
        };
        // `send`, not `try_send`: tokio only learns that a new socket is writable from its
        // first readiness event, so a `try_send` right after creating the flow would drop the
        // flow's first datagram. A connected UDP send waits for buffer space at most.
        match flow.sock.send(payload).await {
            Ok(_) => BackendStats::add(&flow.backend.stats.bytes_in, n as u64),
            Err(e) => {
                BackendStats::add(&flow.backend.stats.errors, 1);
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    vip.passive_fail(&flow.backend, format!("UDP: {e}"));
                }
                end_flow(&flows, peer, &flow);
            }
        }
    }
}

/// Removes `flow` (if it is still `peer`'s) and tells its task to stop.
fn end_flow(flows: &Flows, peer: SocketAddr, flow: &Arc<Flow>) {
    let mut m = flows.lock().unwrap();
    if m.get(&peer).is_some_and(|f| Arc::ptr_eq(f, flow)) {
        m.remove(&peer);
    }
    flow.stop.notify_one();
}

async fn new_flow(
    vip: &Arc<Vip>,
    vip_sock: &Arc<UdpSocket>,
    flows: &Flows,
    peer: SocketAddr,
    idle: Duration,
    epoch: Instant,
) -> Option<Arc<Flow>> {
    if flows.lock().unwrap().len() >= MAX_FLOWS {
        return None;
    }
    for _ in 0..crate::proxy::MAX_ATTEMPTS {
        let backend = vip.choose(peer)?;
        let any: IpAddr = if backend.addr.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let sock = match vip.backend_udp_socket(SocketAddr::new(any, 0)).await {
            Ok(s) => s,
            Err(e) => {
                vip.release(&backend);
                tracing::debug!(vip = %vip.name, error = %e, "UDP flow socket");
                return None;
            }
        };
        if let Err(e) = sock.connect(backend.addr).await {
            BackendStats::add(&backend.stats.errors, 1);
            vip.passive_fail(&backend, format!("UDP connect: {e}"));
            vip.release(&backend);
            continue;
        }
        let flow = Arc::new(Flow {
            sock,
            backend,
            last_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            stop: Notify::new(),
        });
        flows.lock().unwrap().insert(peer, flow.clone());
        BackendStats::add(&vip.stats.accepted, 1);
        tokio::spawn(flow_task(
            vip.clone(),
            vip_sock.clone(),
            flows.clone(),
            flow.clone(),
            peer,
            idle,
            epoch,
        ));
        return Some(flow);
    }
    None
}

/// Carries the backend's answers to the client until the flow ends, then frees its slot.
async fn flow_task(
    vip: Arc<Vip>,
    vip_sock: Arc<UdpSocket>,
    flows: Flows,
    flow: Arc<Flow>,
    peer: SocketAddr,
    idle: Duration,
    epoch: Instant,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut close_rx = flow.backend.close_rx();
    let idle_ms = idle.as_millis() as u64;
    loop {
        let deadline = *close_rx.borrow_and_update();
        let last = flow.last_ms.load(Ordering::Relaxed);
        let now = epoch.elapsed().as_millis() as u64;
        let idle_left = Duration::from_millis((last + idle_ms).saturating_sub(now));
        if idle_left.is_zero() {
            break;
        }
        tokio::select! {
            r = flow.sock.recv(&mut buf) => match r {
                Ok(n) => {
                    flow.last_ms.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if vip_sock.send_to(&buf[..n], peer).await.is_ok() {
                        BackendStats::add(&flow.backend.stats.bytes_out, n as u64);
                    }
                }
                Err(e) => {
                    BackendStats::add(&flow.backend.stats.errors, 1);
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        vip.passive_fail(&flow.backend, format!("UDP: {e}"));
                    }
                    break;
                }
            },
            _ = tokio::time::sleep(idle_left) => {}
            _ = flow.stop.notified() => break,
            r = close_rx.changed() => {
                if r.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                BackendStats::add(&flow.backend.stats.drain_closed, 1);
                break;
            }
        }
    }
    {
        let mut m = flows.lock().unwrap();
        if m.get(&peer).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
            m.remove(&peer);
        }
    }
    vip.release(&flow.backend);
}
