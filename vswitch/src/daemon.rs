//! Running vswitch: the VXLAN underlay socket, one task per attached port device, the
//! control-plane loops (register, watch `/v1/netstate`, heartbeat with port counters) and the
//! HTTP endpoint (`/metrics`, `/healthz`).
//!
//! Every frame goes through [`Switch`] (pure forwarding decisions, under one mutex held only
//! for the decision) and the resulting actions are carried out here: delivery to a local
//! device (the virtio-net header passes through, so TSO frames stay large between local
//! ports), encapsulation towards a VTEP (large TSO frames are segmented in software first, and
//! the segments go out as one UDP GSO send), or a frame the switch made (ARP, DHCP replies).

use crate::config::Config;
use crate::packet::PacketPort;
use crate::switch::{Action, LocalPort, PortId, Switch};
use crate::tap::Tap;
use crate::underlay::{RecvBatch, Underlay};
use crate::vnet::{self, Coalescer, VnetHdr};
use crate::vxlan;
use anyhow::Context;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use volume_mgr::api::{self, PortKind};
use volume_mgr::client::Client;

/// The virtio-net header of a frame that needs nothing (checksums complete, no GSO).
const ZERO_HDR: [u8; VnetHdr::LEN] = [0; VnetHdr::LEN];

/// A port's device: a tap we own or someone else's interface through AF_PACKET.
enum Dev {
    Tap(Tap),
    Packet(PacketPort),
}

impl Dev {
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Dev::Tap(t) => t.recv(buf).await,
            Dev::Packet(p) => p.recv(buf).await,
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Dev::Tap(t) => t.try_recv(buf),
            Dev::Packet(p) => p.try_recv(buf),
        }
    }

    /// Sends without waiting: a full queue drops the frame (counted), as a NIC would.
    fn try_send(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Dev::Tap(t) => t.try_send(buf),
            Dev::Packet(p) => p.try_send(buf),
        }
    }
}

/// An attached port: its device and the task reading it.
struct Attached {
    name: String,
    dev: Arc<Dev>,
}

/// What the daemon has programmed for one local port (to notice changes that need a new
/// device: another ifname, kind, netns, MAC or MTU).
#[derive(Clone, PartialEq, Eq)]
struct DevSpec {
    kind: PortKind,
    ifname: String,
    netns: Option<String>,
    mac: [u8; 6],
    mtu: u32,
}

struct Shared {
    node: String,
    switch: Mutex<Switch>,
    devices: RwLock<HashMap<PortId, Attached>>,
    underlay: Underlay,
    start: Instant,
    /// Frames that could not be encapsulated (a bad GSO request, an unsegmentable frame).
    encap_errors: AtomicU64,
    /// Underlay send failures.
    underlay_tx_errors: AtomicU64,
    /// Control-plane state applied.
    revision: AtomicU64,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn dev(&self, id: PortId) -> Option<Arc<Dev>> {
        self.devices.read().unwrap().get(&id).map(|a| a.dev.clone())
    }

    /// Delivers `buf` (virtio-net header + frame) to local port `id`.
    fn deliver(&self, id: PortId, buf: &[u8]) {
        let dev = self.dev(id);
        self.deliver_to(id, dev.as_deref(), buf);
    }

    /// Delivers `buf` to port `id` whose device (looked up by the caller) is `dev`. A failed
    /// GSO frame counts one drop per segment it stood for.
    fn deliver_to(&self, id: PortId, dev: Option<&Dev>, buf: &[u8]) {
        let reason = match dev {
            Some(d) => match d.try_send(buf) {
                Ok(_) => return,
                Err(_) => "queue_full",
            },
            None => "no_destination",
        };
        let frames = gso_segments(buf);
        let mut sw = self.switch.lock().unwrap();
        for _ in 0..frames {
            sw.count_drop(id, reason);
        }
    }
}

/// How many frames a buffer (virtio-net header + frame) stands for: 1, or a GSO frame's
/// segment count (estimated from its header; at least 1).
fn gso_segments(buf: &[u8]) -> usize {
    match VnetHdr::parse(buf) {
        Ok(h) if h.is_gso() && h.gso_size > 0 => {
            let payload = buf
                .len()
                .saturating_sub(VnetHdr::LEN + usize::from(h.hdr_len));
            payload.div_ceil(usize::from(h.gso_size)).max(1)
        }
        _ => 1,
    }
}

/// Runs vswitch until `shutdown` resolves. Devices it created are deleted when it stops.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let underlay_mtu = crate::underlay::interface_mtu(cfg.underlay_ip).with_context(|| {
        format!(
            "underlay-ip {}: no interface of this host has that address",
            cfg.underlay_ip
        )
    })?;
    // Loopback's MTU is 65536; no IPv4 packet is longer than 65535 (and the manager takes
    // underlay MTUs up to that).
    let underlay_mtu = underlay_mtu.min(65_535);
    let underlay =
        Underlay::bind(cfg.underlay_ip, cfg.vxlan_port, cfg.tx_sockets).with_context(|| {
            format!(
                "binding the VXLAN socket {}:{}",
                cfg.underlay_ip, cfg.vxlan_port
            )
        })?;
    tracing::info!(underlay = %cfg.underlay_ip, port = cfg.vxlan_port, mtu = underlay_mtu, "VXLAN underlay ready");
    let shared = Arc::new(Shared {
        node: cfg.node.clone(),
        switch: Mutex::new({
            let mut sw = Switch::new(&cfg.node, underlay_mtu);
            sw.set_vxlan_port(cfg.vxlan_port);
            sw
        }),
        devices: RwLock::new(HashMap::new()),
        underlay,
        start: Instant::now(),
        encap_errors: AtomicU64::new(0),
        underlay_tx_errors: AtomicU64::new(0),
        revision: AtomicU64::new(0),
    });
    let client = Client::new(cfg.manager.clone())
        .with_auth(cfg.manager_token.clone(), cfg.manager_ca.as_deref())?;
    let reg = api::RegisterSwitch {
        underlay_ip: cfg.underlay_ip.to_string(),
        vxlan_port: cfg.vxlan_port,
        underlay_mtu,
    };

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.http_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on http-listen {addr}"))?;
        tracing::info!(%addr, "metrics listening");
        let app = http(shared.clone());
        tasks.spawn(async move {
            let _ = axum::serve(l, app).await;
        });
    }
    tasks.spawn(underlay_loop(shared.clone()));
    tasks.spawn(control_loop(shared.clone(), client.clone(), reg.clone()));
    tasks.spawn(heartbeat_loop(
        shared.clone(),
        client,
        reg,
        cfg.heartbeat_interval,
    ));
    {
        let shared = shared.clone();
        tasks.spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                let now = shared.now_ms();
                shared.switch.lock().unwrap().tick(now);
            }
        });
    }
    shutdown.await;
    tracing::info!("vswitch stopping");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // Port tasks hold device references; dropping the map deletes our taps.
    shared.devices.write().unwrap().clear();
    tracing::info!("vswitch stopped");
    Ok(())
}

/// Registers (retrying until the manager answers), then follows `/v1/netstate`.
async fn control_loop(shared: Arc<Shared>, client: Client, reg: api::RegisterSwitch) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.register_switch(&shared.node, &reg).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "registering with volume-mgr failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!(node = %shared.node, "registered with volume-mgr");
    let mut rev: Option<u64> = None;
    let mut specs: HashMap<PortId, (DevSpec, tokio::task::AbortHandle)> = HashMap::new();
    loop {
        let res = match rev {
            None => client.net_state().await,
            Some(r) => client.watch_net_state(r, Duration::from_secs(30)).await,
        };
        let st = match res {
            Ok(st) => st,
            Err(e) => {
                tracing::warn!(error = %e, "watching the network state failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if rev == Some(st.revision) {
            continue;
        }
        rev = Some(st.revision);
        shared.revision.store(st.revision, Ordering::Relaxed);
        let ports = {
            let mut sw = shared.switch.lock().unwrap();
            sw.apply(&st);
            sw.local_ports()
        };
        reconcile(&shared, &ports, &mut specs);
    }
}

fn spec_of(p: &LocalPort) -> DevSpec {
    DevSpec {
        kind: p.kind,
        ifname: p.ifname.clone(),
        netns: p.netns.clone(),
        mac: p.mac,
        mtu: p.mtu,
    }
}

/// Makes the attached devices match the local ports: new ports get a device (a tap now, a
/// netdev as soon as its interface exists), changed ones a new one, removed ones lose theirs.
fn reconcile(
    shared: &Arc<Shared>,
    ports: &[LocalPort],
    specs: &mut HashMap<PortId, (DevSpec, tokio::task::AbortHandle)>,
) {
    let want: HashMap<PortId, &LocalPort> = ports.iter().map(|p| (p.id, p)).collect();
    let stale: Vec<PortId> = specs
        .iter()
        .filter(|(id, (spec, _))| want.get(id).is_none_or(|p| spec_of(p) != *spec))
        .map(|(id, _)| *id)
        .collect();
    for id in stale {
        if let Some((spec, task)) = specs.remove(&id) {
            task.abort();
            if let Some(a) = shared.devices.write().unwrap().remove(&id) {
                tracing::info!(port = %a.name, ifname = %spec.ifname, "port detached");
            }
        }
    }
    for p in ports {
        if specs.contains_key(&p.id) {
            continue;
        }
        let task = tokio::spawn(port_task(shared.clone(), p.clone()));
        specs.insert(p.id, (spec_of(p), task.abort_handle()));
    }
}

/// Attaches one port's device (retrying: a netdev's interface appears when QEMU starts and
/// goes away when it stops) and forwards what it sends.
async fn port_task(shared: Arc<Shared>, p: LocalPort) {
    let mut logged = false;
    loop {
        let dev = match attach(&p).await {
            Ok(d) => Arc::new(d),
            Err(e) => {
                if !logged {
                    tracing::warn!(port = %p.name, ifname = %p.ifname, error = %e, "cannot attach the port's interface yet; retrying");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        logged = false;
        tracing::info!(port = %p.name, ifname = %p.ifname, kind = ?p.kind, "port attached");
        shared.devices.write().unwrap().insert(
            p.id,
            Attached {
                name: p.name.clone(),
                dev: dev.clone(),
            },
        );
        let err = port_rx(&shared, p.id, &dev).await;
        shared.devices.write().unwrap().remove(&p.id);
        tracing::warn!(port = %p.name, ifname = %p.ifname, error = %err, "port interface lost; waiting for it to come back");
        drop(dev);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn attach(p: &LocalPort) -> std::io::Result<Dev> {
    match p.kind {
        PortKind::Tap => {
            let (name, mtu, mac, netns) = (p.ifname.clone(), p.mtu, p.mac, p.netns.clone());
            tokio::task::spawn_blocking(move || Tap::create(&name, mtu, mac, netns.as_deref()))
                .await
                .map_err(std::io::Error::other)?
                .map(Dev::Tap)
        }
        PortKind::Netdev => {
            if crate::packet::ifindex(&p.ifname).is_none() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no interface {}", p.ifname),
                ));
            }
            PacketPort::open(&p.ifname, Some(p.mtu)).map(Dev::Packet)
        }
    }
}

/// Encapsulated frames of one flow to one VTEP, all the same size, waiting to go out as one
/// UDP GSO send (a burst of small packets costs one syscall instead of one each).
struct TxRun {
    vtep: SocketAddrV4,
    hash: u32,
    seg_len: usize,
    count: usize,
    buf: Vec<u8>,
}

impl TxRun {
    /// Most datagrams in one run (the kernel's UDP GSO limit on older kernels).
    const MAX: usize = 64;

    fn new() -> TxRun {
        TxRun {
            vtep: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            hash: 0,
            seg_len: 0,
            count: 0,
            buf: Vec::with_capacity(65_536),
        }
    }

    /// Can a datagram of `len` bytes for (`vtep`, `hash`) join the run?
    fn fits(&self, vtep: SocketAddrV4, hash: u32, len: usize) -> bool {
        self.count > 0
            && self.count < Self::MAX
            && self.vtep == vtep
            && self.hash == hash
            && self.seg_len == len
            && self.buf.len() + len <= 65_507
    }

    async fn flush(&mut self, shared: &Arc<Shared>) {
        if self.count == 0 {
            return;
        }
        let segs = vnet::Segmented {
            count: self.count,
            seg_len: self.seg_len,
        };
        send_segments(shared, self.vtep, &self.buf, segs).await;
        self.count = 0;
        self.buf.clear();
    }
}

/// Reads frames from a port's device until it fails; returns the error. After each frame,
/// what else is queued is taken without waiting; small frames of one flow to one VTEP are
/// sent together ([`TxRun`]) when the queue runs dry or the run ends.
async fn port_rx(shared: &Arc<Shared>, id: PortId, dev: &Arc<Dev>) -> std::io::Error {
    let mut buf = vec![0u8; vnet::BUF_LEN];
    let mut actions = Vec::new();
    let mut out = Vec::with_capacity(2 * 65_536);
    let mut run = TxRun::new();
    loop {
        let got = if run.count == 0 {
            dev.recv(&mut buf).await
        } else {
            dev.try_recv(&mut buf)
        };
        let n = match got {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                run.flush(shared).await;
                continue;
            }
            Err(e) => {
                run.flush(shared).await;
                return e;
            }
        };
        if n < VnetHdr::LEN {
            continue;
        }
        let (hb, frame) = buf[..n].split_at_mut(VnetHdr::LEN);
        let hdr = match VnetHdr::parse(hb) {
            Ok(h) => h,
            Err(_) => {
                shared.switch.lock().unwrap().count_drop(id, "malformed");
                continue;
            }
        };
        let gso = hdr.is_gso();
        {
            let now = shared.now_ms();
            shared
                .switch
                .lock()
                .unwrap()
                .from_port(id, frame, gso, now, &mut actions);
        }
        let mut csum_done = false;
        for a in actions.drain(..) {
            match a {
                Action::ToPort(dst) => shared.deliver(dst, &buf[..n]),
                Action::ToVtep { vtep, vni } => {
                    let frame = &mut buf[VnetHdr::LEN..n];
                    if gso {
                        run.flush(shared).await;
                        let prefix = vxlan::encap_header(vni);
                        match vnet::segment_into(&hdr, frame, &prefix, &mut out) {
                            Ok(segs) => send_segments(shared, vtep, &out, segs).await,
                            Err(_) => {
                                shared.encap_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else {
                        if hdr.needs_csum() && !csum_done {
                            if vnet::complete_checksum(&hdr, frame).is_err() {
                                shared.encap_errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            csum_done = true;
                        }
                        let hash = vxlan::flow_hash(frame);
                        let len = vxlan::HEADER_LEN + frame.len();
                        if !run.fits(vtep, hash, len) {
                            run.flush(shared).await;
                            run.vtep = vtep;
                            run.hash = hash;
                            run.seg_len = len;
                        }
                        run.buf.extend_from_slice(&vxlan::encap_header(vni));
                        run.buf.extend_from_slice(frame);
                        run.count += 1;
                    }
                }
                Action::Reply { port, frame } => {
                    out.clear();
                    out.extend_from_slice(&ZERO_HDR);
                    out.extend_from_slice(&frame);
                    shared.deliver(port, &out);
                }
            }
        }
        if run.count >= TxRun::MAX {
            run.flush(shared).await;
        }
    }
}

/// Sends software-segmented, already encapsulated frames (`datagrams`, laid out by
/// [`vnet::segment_into`]: all `segs.seg_len` bytes but the last) as one UDP GSO batch.
async fn send_segments(
    shared: &Arc<Shared>,
    vtep: SocketAddrV4,
    datagrams: &[u8],
    segs: vnet::Segmented,
) {
    let Some(first) = datagrams.get(vxlan::HEADER_LEN..segs.seg_len) else {
        return;
    };
    let hash = vxlan::flow_hash(first);
    let res = if segs.count > 1 && segs.seg_len <= u16::MAX as usize {
        shared
            .underlay
            .send_gso(hash, vtep, datagrams, segs.seg_len as u16)
            .await
    } else {
        let mut r = Ok(());
        for d in datagrams.chunks(segs.seg_len.max(1)) {
            r = r.and(shared.underlay.send(hash, vtep, d).await);
        }
        r
    };
    if res.is_err() {
        shared.underlay_tx_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Receives VXLAN packets and delivers their inner frames. The switch decides a whole
/// receive batch under one lock; consecutive TCP segments of one flow for one tap port are
/// coalesced into one GSO frame ([`Coalescer`]) so the tap and the stack behind it handle
/// one 64 KiB packet instead of dozens.
async fn underlay_loop(shared: Arc<Shared>) {
    let mut batch = RecvBatch::new(64);
    let mut actions = Vec::new();
    let mut one = Vec::new();
    // Per datagram of the batch: its actions' range in `actions`.
    let mut decided: Vec<(usize, usize)> = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(65_536);
    let mut co = Coalescer::new();
    let zero = ZERO_HDR;
    loop {
        if let Err(e) = shared.underlay.recv_batch(&mut batch).await {
            tracing::warn!(error = %e, "underlay receive failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        actions.clear();
        decided.clear();
        {
            let now = shared.now_ms();
            let mut sw = shared.switch.lock().unwrap();
            for (src, payload) in batch.iter() {
                // from_underlay replaces what its output vector holds.
                sw.from_underlay(src, payload, now, &mut one);
                let start = actions.len();
                actions.append(&mut one);
                decided.push((start, actions.len()));
            }
        }
        // No await from here to the end of the batch: the device map stays read-locked.
        let devices = shared.devices.read().unwrap();
        let dev = |id: PortId| devices.get(&id).map(|a| &*a.dev);
        // The tap port the coalescer is building a frame for.
        let mut co_dst: Option<PortId> = None;
        for ((_, payload), &(a, b)) in batch.iter().zip(decided.iter()) {
            if a == b {
                continue;
            }
            let inner = match vxlan::decap(payload) {
                Ok((_, inner)) => inner,
                Err(_) => continue,
            };
            if let [Action::ToPort(dst)] = &actions[a..b] {
                if let Some(d @ Dev::Tap(_)) = dev(*dst) {
                    if co_dst != Some(*dst) {
                        if let Some(prev) = co_dst {
                            co.flush(&mut |buf: &[u8]| shared.deliver_to(prev, dev(prev), buf));
                        }
                        co_dst = Some(*dst);
                    }
                    let dst = *dst;
                    co.push(inner, &mut |buf: &[u8]| {
                        shared.deliver_to(dst, Some(d), buf)
                    });
                    continue;
                }
            }
            if let Some(prev) = co_dst.take() {
                co.flush(&mut |buf: &[u8]| shared.deliver_to(prev, dev(prev), buf));
            }
            for act in &actions[a..b] {
                match act {
                    Action::ToPort(dst) => {
                        out.clear();
                        out.extend_from_slice(&zero);
                        out.extend_from_slice(inner);
                        shared.deliver_to(*dst, dev(*dst), &out);
                    }
                    Action::Reply { port, frame } => {
                        out.clear();
                        out.extend_from_slice(&zero);
                        out.extend_from_slice(frame);
                        shared.deliver_to(*port, dev(*port), &out);
                    }
                    Action::ToVtep { .. } => {}
                }
            }
        }
        if let Some(prev) = co_dst {
            co.flush(&mut |buf: &[u8]| shared.deliver_to(prev, dev(prev), buf));
        }
    }
}

/// Heartbeats with the port counters; re-registers when the manager forgot this switch.
async fn heartbeat_loop(
    shared: Arc<Shared>,
    client: Client,
    reg: api::RegisterSwitch,
    every: Duration,
) {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let hb = {
            let attached: Vec<PortId> = shared.devices.read().unwrap().keys().copied().collect();
            let sw = shared.switch.lock().unwrap();
            let mut hb = api::SwitchHeartbeat::default();
            for p in sw.local_ports() {
                let mut st = sw.port_stats(p.id).unwrap_or_default();
                st.attached = attached.contains(&p.id);
                hb.ports.insert(p.name.clone(), st);
            }
            hb
        };
        match client.switch_heartbeat(&shared.node, &hb).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                tracing::info!("volume-mgr does not know this switch; registering again");
                if let Err(e) = client.register_switch(&shared.node, &reg).await {
                    tracing::warn!(error = %e, "registering again failed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

fn http(shared: Arc<Shared>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let shared = shared.clone();
                async move { metrics(&shared) }
            }),
        )
}

fn metrics(shared: &Shared) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    shared.switch.lock().unwrap().render_metrics(&mut out);
    let attached = shared.devices.read().unwrap().len();
    let _ = writeln!(
        out,
        "# HELP vswitch_ports_attached Local ports with their interface attached.\n# TYPE vswitch_ports_attached gauge\nvswitch_ports_attached {attached}"
    );
    let _ = writeln!(
        out,
        "# HELP vswitch_encap_errors_total Frames that could not be encapsulated (bad GSO request or checksum offsets).\n# TYPE vswitch_encap_errors_total counter\nvswitch_encap_errors_total {}",
        shared.encap_errors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP vswitch_underlay_tx_errors_total VXLAN sends the kernel refused.\n# TYPE vswitch_underlay_tx_errors_total counter\nvswitch_underlay_tx_errors_total {}",
        shared.underlay_tx_errors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP vswitch_netstate_revision Control-plane revision last applied.\n# TYPE vswitch_netstate_revision gauge\nvswitch_netstate_revision {}",
        shared.revision.load(Ordering::Relaxed)
    );
    out
}
