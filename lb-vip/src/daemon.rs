//! The lb-vip daemon: follows the VIPs in volume-mgr (`GET /v1/vips?after_revision=`,
//! long-poll) and reconciles them into listeners ([`proxy`](crate::proxy) for TCP,
//! [`udp`](crate::udp) for UDP), one health-check task per backend, status reports to the
//! manager (`PUT /v1/vips/{name}/status/{node}`) and the HTTP endpoint (`/metrics`,
//! `/healthz`).
//!
//! Reconfiguration keeps what did not change: a VIP whose address and protocol stay keeps its
//! socket (its scheduler, persistence table and backends are updated in place, backends
//! keep their health and counters by address); established connections are separate tasks
//! and are never cut by a reconfiguration, except that the connections of a drained or
//! removed backend end when its drain time runs out.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use volume_mgr::api;
use volume_mgr::client::Client;

use crate::config::{BackendConfig, BackendState, Config, VipConfig};
use crate::health::{CheckKind, CheckParams, Health, Transition};
use crate::metrics::{BackendStats, VipStats};
use crate::sched::{Algo, BackendSpec, FlowKey, Persist, Proto, SchedOptions, Scheduler};

/// Wall-clock milliseconds since the epoch (the unit of `drain_started_ms`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The tokio instant at wall-clock time `at_ms` (now if it has passed).
fn instant_at(at_ms: u64) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let wait = Duration::from_millis(at_ms.saturating_sub(now_ms()));
    // Any time a client could send (u64 milliseconds) fits after a cap of ten years.
    now + wait.min(Duration::from_secs(10 * 365 * 86_400))
}

/// One backend of a running VIP. Connections hold it (`Arc`) while they last, also after the
/// backend left the VIP.
#[derive(Debug)]
pub struct Backend {
    /// `IP:PORT` as the control plane spells it.
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<BackendStats>,
    /// When its established connections must end (drained or removed), if ever.
    close_tx: watch::Sender<Option<tokio::time::Instant>>,
    health: Mutex<Health>,
    check: Mutex<Option<AbortHandle>>,
}

impl Backend {
    fn new(name: String, addr: SocketAddr) -> Backend {
        Backend {
            name,
            addr,
            stats: Arc::new(BackendStats::new()),
            close_tx: watch::channel(None).0,
            health: Mutex::new(Health::new(now_ms())),
            check: Mutex::new(None),
        }
    }

    /// The close deadline, watched by the backend's connections.
    pub fn close_rx(&self) -> watch::Receiver<Option<tokio::time::Instant>> {
        self.close_tx.subscribe()
    }

    pub fn is_up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    /// Healthy and administratively active (limits aside).
    pub fn usable(&self) -> bool {
        self.is_up() && self.stats.serving.load(Ordering::Relaxed)
    }

    fn set_close_at(&self, at: Option<tokio::time::Instant>) {
        self.close_tx.send_if_modified(|cur| {
            let new = match (at, *cur) {
                // An earlier deadline stays.
                (Some(a), Some(c)) => Some(a.min(c)),
                (a, _) => a,
            };
            let changed = *cur != new;
            *cur = new;
            changed
        });
    }

    fn stop_check(&self) {
        if let Some(h) = self.check.lock().unwrap().take() {
            h.abort();
        }
    }

    fn on_transition(&self, vip: &str, t: Option<Transition>) {
        let Some(t) = t else { return };
        BackendStats::add(&self.stats.transitions, 1);
        let up = t == Transition::Up;
        self.stats.up.store(up, Ordering::Relaxed);
        let why = self.health.lock().unwrap().last_error().map(str::to_string);
        if up {
            tracing::info!(vip, backend = %self.name, "backend up");
        } else {
            tracing::warn!(vip, backend = %self.name, reason = why.as_deref().unwrap_or(""), "backend down");
        }
    }
}

struct VipState {
    cfg: VipConfig,
    sched: Scheduler,
    persist: Persist,
    /// Index-aligned with `sched`'s backends.
    backends: Vec<Arc<Backend>>,
}

/// A VIP this instance serves.
pub struct Vip {
    pub name: String,
    pub addr: SocketAddr,
    pub proto: Proto,
    pub connect_timeout: Duration,
    pub stats: VipStats,
    /// The overlay network the VIP lives on, if any.
    pub network: Option<String>,
    proxy_protocol: AtomicBool,
    state: Mutex<VipState>,
    /// An overlay VIP's namespace while this node holds it: its socket, the connections to
    /// its backends and its health checks are made there.
    netns: Mutex<Option<Arc<crate::overlay::NetnsSockets>>>,
    /// An overlay VIP's address is in place (its port is here): health checks run.
    overlay_ready: AtomicBool,
}

impl Vip {
    /// A VIP with `cfg` (no backends started yet: call [`apply`](Self::apply)).
    fn new(cfg: &VipConfig, connect_timeout: Duration, maglev_size: usize) -> Vip {
        let opts = SchedOptions {
            maglev_size,
            seed: crate::sched::client_hash(cfg.addr.ip()) | 1,
            ..SchedOptions::default()
        };
        let sched = Scheduler::with_options(cfg.algo, &[], opts)
            .or_else(|_| Scheduler::new(cfg.algo, &[]))
            .unwrap_or_else(|_| {
                Scheduler::new(Algo::Rr, &[]).expect("an empty rr scheduler always builds")
            });
        Vip {
            name: cfg.name.clone(),
            addr: cfg.addr,
            proto: cfg.proto,
            connect_timeout,
            stats: VipStats::default(),
            network: cfg.network.clone(),
            netns: Mutex::new(None),
            overlay_ready: AtomicBool::new(false),
            proxy_protocol: AtomicBool::new(cfg.proxy_protocol),
            state: Mutex::new(VipState {
                cfg: VipConfig {
                    backends: Vec::new(),
                    ..cfg.clone()
                },
                sched,
                persist: Persist::new(cfg.persist_secs.saturating_mul(1000)),
                backends: Vec::new(),
            }),
        }
    }

    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol.load(Ordering::Relaxed)
    }

    /// The namespace an overlay VIP's sockets are made in (while held).
    pub fn netns(&self) -> Option<Arc<crate::overlay::NetnsSockets>> {
        self.netns.lock().unwrap().clone()
    }

    pub(crate) fn set_netns(&self, ns: Option<Arc<crate::overlay::NetnsSockets>>) {
        *self.netns.lock().unwrap() = ns;
    }

    pub(crate) fn set_overlay_ready(&self, ready: bool) {
        self.overlay_ready.store(ready, Ordering::Relaxed);
    }

    /// Whether active checks run now: always for a VIP on the host's networks; for an
    /// overlay VIP only while its address is in place here (elsewhere its backends are not
    /// reachable, and a check failing there would only make a later holder wait for `rise`).
    pub fn checks_ready(&self) -> bool {
        self.network.is_none() || self.overlay_ready.load(Ordering::Relaxed)
    }

    /// A TCP connection to backend `addr`, bounded by the connect timeout (from the overlay
    /// namespace for an overlay VIP).
    pub async fn connect_backend(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        if let Some(ns) = self.netns() {
            return ns.tcp_connect(addr, self.connect_timeout).await;
        }
        match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.connect_timeout),
            )),
        }
    }

    /// A UDP socket for a flow to a backend (in the overlay namespace for an overlay VIP).
    pub async fn backend_udp_socket(
        &self,
        any: SocketAddr,
    ) -> std::io::Result<tokio::net::UdpSocket> {
        match self.netns() {
            Some(ns) => {
                let s = ns.udp_socket(any).await?;
                s.set_nonblocking(true)?;
                tokio::net::UdpSocket::from_std(s)
            }
            None => tokio::net::UdpSocket::bind(any).await,
        }
    }

    /// Chooses a backend for a new connection (flow) from `client` and counts it as active
    /// (give it back with [`release`](Self::release)). None: no backend is usable.
    pub fn choose(&self, client: SocketAddr) -> Option<Arc<Backend>> {
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let flow = FlowKey::new(client, self.addr, self.proto);
        let backends = &st.backends;
        let i = st
            .persist
            .pick(&mut st.sched, &flow, now_ms(), |i| backends[i].usable())?;
        st.sched.conn_opened(i);
        let b = st.backends[i].clone();
        BackendStats::add(&b.stats.active, 1);
        BackendStats::add(&b.stats.total, 1);
        Some(b)
    }

    /// A connection (flow) chosen by [`choose`](Self::choose) ended.
    pub fn release(&self, b: &Arc<Backend>) {
        BackendStats::sub(&b.stats.active);
        let mut st = self.state.lock().unwrap();
        if let Some(i) = st.backends.iter().position(|x| Arc::ptr_eq(x, b)) {
            st.sched.conn_closed(i);
        }
    }

    /// Passive check: connecting to `b` failed; it is down at once.
    pub fn passive_fail(&self, b: &Backend, why: String) {
        let t = b.health.lock().unwrap().mark_down(why, now_ms());
        b.on_transition(&self.name, t);
    }

    fn check_params(&self) -> CheckParams {
        self.state.lock().unwrap().cfg.check.clone()
    }

    /// Applies a new configuration (same address and protocol). Backends are matched by
    /// address: kept ones keep health, counters and connections. On a scheduler error
    /// (bad weight, table size) nothing changes.
    pub fn apply(self: &Arc<Self>, cfg: VipConfig) -> Result<(), String> {
        let mut started = Vec::new();
        let mut removed = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            let specs: Vec<BackendSpec> = cfg
                .backends
                .iter()
                .map(|b| BackendSpec {
                    name: b.addr.to_string(),
                    weight: b.weight,
                    max_conns: b.max_conns,
                })
                .collect();
            let map = st
                .sched
                .reconfigure(cfg.algo, &specs)
                .map_err(|e| e.to_string())?;
            let mut by_name: HashMap<String, Arc<Backend>> = st
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.clone()))
                .collect();
            let mut backends = Vec::with_capacity(cfg.backends.len());
            for b in &cfg.backends {
                let name = b.addr.to_string();
                let be = match by_name.remove(&name) {
                    Some(be) => be,
                    None => {
                        let be = Arc::new(Backend::new(name, b.addr));
                        started.push(be.clone());
                        be
                    }
                };
                match b.state {
                    BackendState::Active => {
                        be.stats.serving.store(true, Ordering::Relaxed);
                        be.set_close_at(None);
                    }
                    BackendState::Draining { started_ms } => {
                        be.stats.serving.store(false, Ordering::Relaxed);
                        be.set_close_at(Some(instant_at(
                            started_ms.saturating_add(cfg.drain_secs.saturating_mul(1000)),
                        )));
                    }
                }
                backends.push(be);
            }
            removed.extend(by_name.into_values());
            if st.cfg.persist_secs != cfg.persist_secs {
                st.persist = Persist::new(cfg.persist_secs.saturating_mul(1000));
            } else {
                st.persist.remap(&map);
            }
            st.backends = backends;
            self.proxy_protocol
                .store(cfg.proxy_protocol, Ordering::Relaxed);
            st.cfg = cfg;
        }
        let drain = Duration::from_secs(self.state.lock().unwrap().cfg.drain_secs);
        for b in removed {
            tracing::info!(vip = %self.name, backend = %b.name, "backend removed; draining its connections");
            b.stats.serving.store(false, Ordering::Relaxed);
            b.stop_check();
            b.set_close_at(Some(tokio::time::Instant::now() + drain));
        }
        for b in started {
            let task = tokio::spawn(check_loop(Arc::downgrade(self), b.clone()));
            *b.check.lock().unwrap() = Some(task.abort_handle());
        }
        Ok(())
    }

    /// Stops everything of the VIP: checks end, established connections get the drain time.
    fn shutdown(&self) {
        let st = self.state.lock().unwrap();
        let drain = Duration::from_secs(st.cfg.drain_secs);
        for b in &st.backends {
            b.stats.serving.store(false, Ordering::Relaxed);
            b.stop_check();
            b.set_close_at(Some(tokio::time::Instant::now() + drain));
        }
    }

    /// The backends now (in configuration order).
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.state.lock().unwrap().backends.clone()
    }
}

/// Active checks of one backend, every `interval`, until aborted (or the VIP is gone). UDP
/// VIPs with the default TCP check have passive checks only (see below); an HTTP check is
/// run as configured (a TCP service beside the UDP one).
async fn check_loop(vip: std::sync::Weak<Vip>, b: Arc<Backend>) {
    loop {
        let Some(p) = vip.upgrade().map(|v| v.check_params()) else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(p.interval_ms.max(10))).await;
        let Some(v) = vip.upgrade() else { return };
        if !v.checks_ready() {
            continue;
        }
        let (udp, ns) = (v.proto == Proto::Udp, v.netns());
        drop(v);
        let res = if udp && p.kind == CheckKind::Tcp {
            // A UDP backend has no TCP port to connect to: health is passive only (ICMP port
            // unreachable takes it down), and a downed backend is tried again after `rise`
            // intervals.
            Ok(())
        } else {
            crate::health::probe(b.addr, &p, ns.as_deref())
                .await
                .map_err(|e| e.to_string())
        };
        let Some(v) = vip.upgrade() else { return };
        let t = b.health.lock().unwrap().record(res, &p, now_ms());
        b.on_transition(&v.name, t);
    }
}

/// `api::Vip` → [`VipConfig`].
pub fn vip_config(v: &api::Vip) -> Result<VipConfig, String> {
    let addr: SocketAddr = v
        .addr
        .parse()
        .map_err(|_| format!("addr {:?} is not IP:PORT", v.addr))?;
    let proto = match v.proto {
        api::VipProto::Tcp => Proto::Tcp,
        api::VipProto::Udp => Proto::Udp,
    };
    let algo = match v.algo {
        api::VipAlgo::Rr => Algo::Rr,
        api::VipAlgo::Wrr => Algo::Wrr,
        api::VipAlgo::Lc => Algo::Lc,
        api::VipAlgo::Wlc => Algo::Wlc,
        api::VipAlgo::P2c => Algo::P2c,
        api::VipAlgo::SourceHash => Algo::SourceHash,
        api::VipAlgo::Maglev => Algo::Maglev,
    };
    let kind = match v.check.kind {
        api::CheckKind::Tcp => CheckKind::Tcp,
        api::CheckKind::Http => CheckKind::Http {
            path: v.check.http_path.clone().unwrap_or_else(|| "/".into()),
            status: v.check.http_status.unwrap_or(200),
        },
    };
    let check = CheckParams {
        kind,
        interval_ms: u64::from(v.check.interval_ms),
        timeout_ms: u64::from(v.check.timeout_ms),
        rise: v.check.rise,
        fall: v.check.fall,
    };
    let mut backends = Vec::with_capacity(v.backends.len());
    for b in &v.backends {
        let a: SocketAddr = b
            .addr
            .parse()
            .map_err(|_| format!("backend {:?} is not IP:PORT", b.addr))?;
        backends.push(BackendConfig {
            addr: a,
            weight: b.weight,
            max_conns: b.max_conns,
            state: match b.state {
                api::BackendState::Active => BackendState::Active,
                api::BackendState::Draining => BackendState::Draining {
                    started_ms: b.drain_started_ms.unwrap_or_else(now_ms),
                },
            },
        });
    }
    Ok(VipConfig {
        name: v.name.clone(),
        addr,
        proto,
        algo,
        persist_secs: u64::from(v.persist_secs),
        drain_secs: u64::from(v.drain_secs),
        proxy_protocol: v.proxy_protocol,
        check,
        backends,
        network: v.network.clone(),
    })
}

/// A VIP and its socket task.
struct Entry {
    vip: Arc<Vip>,
    key: (SocketAddr, Proto, Option<String>),
    maglev_size: usize,
    /// The accept / receive loop; None while the address is not local.
    task: Option<AbortHandle>,
    /// Why the last bind failed (logged once per distinct reason).
    bind_error: Option<String>,
    /// With `--vip-interface`: this instance holds the VIP's lease (only then is it bound).
    held: bool,
    /// With `--vip-interface`: the VIP's lease loop.
    ha: Option<HaTask>,
}

/// The lease loop of one VIP ([`crate::ha::lease_loop`]).
struct HaTask {
    /// Stops it; the value says whether to release the lease (clean shutdown).
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl Entry {
    fn listening(&self) -> bool {
        self.task.is_some()
    }
}

/// Shared daemon state.
struct Shared {
    node: String,
    cfg: Config,
    /// For the VIP leases.
    lease_client: Client,
    /// For the rest (overlay VIP ports).
    client: Client,
    vips: Mutex<BTreeMap<String, Entry>>,
    revision: std::sync::atomic::AtomicU64,
}

/// Binds the VIP's socket and starts its loop; logs and leaves it unbound when the address
/// is not on this host (or is taken).
fn start_listener(shared: &Shared, e: &mut Entry) {
    if e.task.is_some() || (e.ha.is_some() && !e.held) {
        return;
    }
    let vip = e.vip.clone();
    let netns = vip.netns();
    let res = match (vip.proto, netns) {
        (Proto::Tcp, None) => crate::proxy::listen(vip.addr)
            .map(|l| tokio::spawn(crate::proxy::serve(vip.clone(), l)).abort_handle()),
        (Proto::Tcp, Some(ns)) => crate::overlay::tcp_listener_in(ns.netns(), vip.addr)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map(|l| tokio::spawn(crate::proxy::serve(vip.clone(), l)).abort_handle()),
        (Proto::Udp, Some(ns)) => crate::overlay::udp_socket_in(ns.netns(), vip.addr)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::UdpSocket::from_std(s)
            })
            .map(|s| {
                tokio::spawn(crate::udp::serve(
                    vip.clone(),
                    s,
                    shared.cfg.udp_idle_timeout,
                ))
                .abort_handle()
            }),
        (Proto::Udp, None) => crate::udp::bind(vip.addr).map(|s| {
            tokio::spawn(crate::udp::serve(
                vip.clone(),
                s,
                shared.cfg.udp_idle_timeout,
            ))
            .abort_handle()
        }),
    };
    match res {
        Ok(h) => {
            tracing::info!(vip = %vip.name, addr = %vip.addr, proto = %vip.proto, "serving VIP");
            e.task = Some(h);
            e.bind_error = None;
        }
        Err(err) => {
            let why = err.to_string();
            if e.bind_error.as_deref() == Some(why.as_str()) {
                return;
            }
            if err.kind() == std::io::ErrorKind::AddrNotAvailable {
                tracing::info!(vip = %vip.name, addr = %vip.addr, "VIP address is not local to this host; skipped (retried every report interval)");
            } else {
                tracing::warn!(vip = %vip.name, addr = %vip.addr, error = %err, "cannot bind the VIP address; skipped (retried every report interval)");
            }
            e.bind_error = Some(why);
        }
    }
}

/// Starts the lease loop of a new entry (with `--vip-interface`), once `after` (the loop of
/// the entry it replaces, which may be removing the same address) has ended.
fn start_ha(
    shared: &Arc<Shared>,
    e: &mut Entry,
    record: &api::Vip,
    after: Option<tokio::task::JoinHandle<()>>,
) {
    // An overlay VIP always has a holder (its port can be on one node only); a VIP on the
    // host's networks only with `--vip-interface`.
    let place = if record.network.is_some() {
        crate::ha::Place::overlay(
            shared.client.clone(),
            record.clone(),
            &shared.cfg.overlay_netns_prefix,
        )
    } else if let Some(ifname) = shared.cfg.vip_interface.clone() {
        crate::ha::Place::Interface(ifname)
    } else {
        return;
    };
    let (stop, stop_rx) = watch::channel(false);
    let weak = Arc::downgrade(shared);
    let (name, vip) = (e.vip.name.clone(), e.vip.clone());
    let serve = move |on: bool| {
        let Some(shared) = weak.upgrade() else { return };
        let mut vips = shared.vips.lock().unwrap();
        let Some(e) = vips.get_mut(&name) else { return };
        if !Arc::ptr_eq(&e.vip, &vip) {
            return;
        }
        e.held = on;
        if on {
            start_listener(&shared, e);
        } else if let Some(t) = e.task.take() {
            t.abort();
            tracing::info!(vip = %name, "VIP socket closed");
        }
    };
    let ctx = crate::ha::LeaseCtx {
        client: shared.lease_client.clone(),
        vip: e.vip.name.clone(),
        node: shared.node.clone(),
        ip: e.vip.addr.ip(),
        place,
        stats: e.vip.clone(),
    };
    let join = tokio::spawn(async move {
        if let Some(j) = after {
            let _ = j.await;
        }
        crate::ha::lease_loop(ctx, serve, stop_rx).await
    });
    e.ha = Some(HaTask { stop, join });
}

/// Makes the running VIPs match `items`.
fn reconcile(shared: &Arc<Shared>, items: &[api::Vip]) {
    let mut vips = shared.vips.lock().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for v in items {
        let cfg = match vip_config(v) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vip = %v.name, error = %e, "VIP not usable; skipped");
                continue;
            }
        };
        seen.insert(cfg.name.clone());
        let maglev_size = v.maglev_table_size as usize;
        let same = vips
            .get(&cfg.name)
            .is_some_and(|e| e.key == cfg.listen_key() && e.maglev_size == maglev_size);
        if !same {
            let mut after = None;
            if let Some(old) = vips.remove(&cfg.name) {
                tracing::info!(vip = %cfg.name, "VIP address changed; new socket");
                after = stop_entry(old);
            }
            let vip = Arc::new(Vip::new(&cfg, shared.cfg.connect_timeout, maglev_size));
            vips.insert(
                cfg.name.clone(),
                Entry {
                    vip,
                    key: cfg.listen_key(),
                    maglev_size,
                    task: None,
                    bind_error: None,
                    held: false,
                    ha: None,
                },
            );
            if let Some(e) = vips.get_mut(&cfg.name) {
                start_ha(shared, e, v, after);
            }
        }
        let Some(e) = vips.get_mut(&cfg.name) else {
            continue;
        };
        if let Err(err) = e.vip.apply(cfg) {
            tracing::warn!(vip = %e.vip.name, error = %err, "VIP configuration refused; keeping the previous one");
        }
        start_listener(shared, e);
    }
    let gone: Vec<String> = vips
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for name in gone {
        if let Some(e) = vips.remove(&name) {
            tracing::info!(vip = %name, "VIP deleted");
            let _ = stop_entry(e);
        }
    }
}

/// Stops an entry's socket and checks; its lease loop (returned) removes the address by
/// itself. The lease is not released: a re-created VIP of this name may be taking it over on
/// this node.
fn stop_entry(e: Entry) -> Option<tokio::task::JoinHandle<()>> {
    if let Some(t) = e.task {
        t.abort();
    }
    e.vip.shutdown();
    e.ha.map(|h| {
        let _ = h.stop.send(false);
        h.join
    })
}

/// Runs lb-vip until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let client = Client::new(cfg.manager.clone())
        .with_auth(cfg.manager_token.clone(), cfg.manager_ca.as_deref())?;
    let shared = Arc::new(Shared {
        node: cfg.node.clone(),
        cfg: cfg.clone(),
        // Lease requests on fresh connections (see `Client::new_unpooled`).
        lease_client: Client::new_unpooled(cfg.manager.clone())
            .with_auth(cfg.manager_token.clone(), cfg.manager_ca.as_deref())?,
        client: client.clone(),
        vips: Mutex::new(BTreeMap::new()),
        revision: std::sync::atomic::AtomicU64::new(0),
    });
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
    tasks.spawn(control_loop(shared.clone(), client.clone()));
    tasks.spawn(report_loop(shared.clone(), client));
    shutdown.await;
    tracing::info!("lb-vip stopping");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let entries: Vec<Entry> = std::mem::take(&mut *shared.vips.lock().unwrap())
        .into_values()
        .collect();
    let mut leases = Vec::new();
    for e in entries {
        if let Some(t) = e.task {
            t.abort();
        }
        if let Some(h) = e.ha {
            // Released, so another instance takes over at once instead of after the ttl.
            let _ = h.stop.send(true);
            leases.push(h.join);
        }
    }
    let all = async {
        for j in leases {
            let _ = j.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .is_err()
    {
        tracing::warn!("VIP leases not all released within 5 s");
    }
    tracing::info!("lb-vip stopped");
    Ok(())
}

/// Follows `/v1/vips` (long-poll) and reconciles.
async fn control_loop(shared: Arc<Shared>, client: Client) {
    let mut rev: Option<u64> = None;
    loop {
        let res = match rev {
            None => client.list_vips().await,
            Some(r) => client.watch_vips(r, Duration::from_secs(30)).await,
        };
        let list = match res {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "watching the VIPs failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if rev == Some(list.revision) {
            continue;
        }
        rev = Some(list.revision);
        shared.revision.store(list.revision, Ordering::Relaxed);
        reconcile(&shared, &list.items);
    }
}

/// Every `report_interval`: the VIPs' status to the manager; binds VIPs whose address became
/// local meanwhile.
async fn report_loop(shared: Arc<Shared>, client: Client) {
    let mut t = tokio::time::interval(shared.cfg.report_interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let reports: Vec<(String, api::VipReport)> = {
            let mut vips = shared.vips.lock().unwrap();
            vips.values_mut()
                .map(|e| {
                    start_listener(&shared, e);
                    (e.vip.name.clone(), report(e))
                })
                .collect()
        };
        for (name, r) in reports {
            if let Err(e) = client.report_vip(&name, &shared.node, &r).await {
                tracing::debug!(vip = %name, error = %e, "status report failed");
            }
        }
    }
}

fn report(e: &Entry) -> api::VipReport {
    api::VipReport {
        holder: e.listening(),
        backends: e
            .vip
            .backends()
            .iter()
            .map(|b| {
                let s = &b.stats;
                api::BackendStats {
                    addr: b.name.clone(),
                    healthy: b.is_up(),
                    active_conns: BackendStats::get(&s.active),
                    total_conns: BackendStats::get(&s.total),
                    bytes_in: BackendStats::get(&s.bytes_in),
                    bytes_out: BackendStats::get(&s.bytes_out),
                    health_transitions: BackendStats::get(&s.transitions),
                    errors: BackendStats::get(&s.errors),
                }
            })
            .collect(),
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
    use crate::metrics::{render, BackendRow, VipRow};
    use std::fmt::Write;
    let entries: Vec<(Arc<Vip>, bool)> = shared
        .vips
        .lock()
        .unwrap()
        .values()
        .map(|e| (e.vip.clone(), e.listening()))
        .collect();
    let backends: Vec<(Arc<Vip>, Vec<Arc<Backend>>)> = entries
        .iter()
        .map(|(v, _)| (v.clone(), v.backends()))
        .collect();
    let vip_rows: Vec<VipRow<'_>> = entries
        .iter()
        .map(|(v, listening)| VipRow {
            vip: &v.name,
            proto: v.proto.as_str(),
            listening: *listening,
            stats: &v.stats,
        })
        .collect();
    let backend_rows: Vec<BackendRow<'_>> = backends
        .iter()
        .flat_map(|(v, bs)| {
            bs.iter().map(move |b| BackendRow {
                vip: &v.name,
                backend: &b.name,
                stats: &b.stats,
            })
        })
        .collect();
    let mut out = String::new();
    render(&mut out, &vip_rows, &backend_rows);
    let _ = writeln!(
        out,
        "# HELP lbvip_revision Control-plane revision last applied.\n# TYPE lbvip_revision gauge\nlbvip_revision {}",
        shared.revision.load(Ordering::Relaxed)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UdpSocket};

    fn cfg(addr: SocketAddr, proto: Proto, backends: &[SocketAddr]) -> VipConfig {
        VipConfig {
            name: "v".into(),
            addr,
            proto,
            algo: Algo::Rr,
            persist_secs: 0,
            drain_secs: 30,
            proxy_protocol: false,
            check: CheckParams {
                interval_ms: 60_000,
                ..CheckParams::default()
            },
            backends: backends
                .iter()
                .map(|a| BackendConfig {
                    addr: *a,
                    weight: 1,
                    max_conns: None,
                    state: BackendState::Active,
                })
                .collect(),
            network: None,
        }
    }

    fn vip(c: &VipConfig) -> Arc<Vip> {
        let v = Arc::new(Vip::new(c, Duration::from_millis(500), 65537));
        v.apply(c.clone()).unwrap();
        v
    }

    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test]
    async fn api_vips_convert_and_extreme_drain_times_do_not_overflow() {
        let v: api::Vip = serde_json::from_value(serde_json::json!({
            "name": "w", "addr": "127.0.0.1:8080", "proto": "tcp", "algo": "source_hash",
            "persist_secs": 5, "drain_secs": 86400, "proxy_protocol": true,
            "maglev_table_size": 65537, "created_ms": 1,
            "check": {"kind": "http", "http_path": "/h", "http_status": 204,
                      "interval_ms": 500, "timeout_ms": 100, "rise": 1, "fall": 2},
            "backends": [
                {"addr": "127.0.0.1:9000", "weight": 3, "state": "active"},
                {"addr": "[::1]:9000", "weight": 1, "max_conns": 7, "state": "draining",
                 "drain_started_ms": u64::MAX},
            ],
        }))
        .unwrap();
        let c = vip_config(&v).unwrap();
        assert_eq!(c.algo, Algo::SourceHash);
        assert_eq!(
            c.check.kind,
            CheckKind::Http {
                path: "/h".into(),
                status: 204
            }
        );
        assert_eq!(c.backends[1].max_conns, Some(7));
        assert_eq!(
            c.backends[1].state,
            BackendState::Draining {
                started_ms: u64::MAX
            }
        );
        let vip = vip(&c);
        assert!(!vip.backends()[1].usable());
        assert!(vip.backends()[0].usable());
        let _ = instant_at(u64::MAX);
        let mut bad = v.clone();
        bad.backends[0].addr = "nowhere".into();
        assert!(vip_config(&bad).unwrap_err().contains("nowhere"));
    }

    #[tokio::test]
    async fn max_conns_and_release() {
        let (a, b) = (closed_port(), closed_port());
        let mut c = cfg("127.0.0.1:1".parse().unwrap(), Proto::Tcp, &[a, b]);
        for be in &mut c.backends {
            be.max_conns = Some(1);
        }
        let v = vip(&c);
        let client: SocketAddr = "127.0.0.9:5000".parse().unwrap();
        let x = v.choose(client).unwrap();
        let y = v.choose(client).unwrap();
        assert_ne!(x.addr, y.addr);
        assert!(v.choose(client).is_none(), "a backend went over max_conns");
        v.release(&x);
        let z = v.choose(client).unwrap();
        assert_eq!(z.addr, x.addr);
        assert_eq!(BackendStats::get(&x.stats.active), 1);
        assert_eq!(BackendStats::get(&x.stats.total), 2);
        // A released connection of a removed backend does not touch the new set's counts.
        c.backends.remove(0);
        v.apply(c).unwrap();
        v.release(&z);
        assert_eq!(BackendStats::get(&z.stats.active), 0);
        assert!(v.choose(client).is_none(), "b is at its limit");
        v.release(&y);
        assert_eq!(v.choose(client).unwrap().addr, b);
    }

    #[tokio::test]
    async fn apply_keeps_backends_by_address() {
        let (a, b, c) = (closed_port(), closed_port(), closed_port());
        let mut conf = cfg("127.0.0.1:1".parse().unwrap(), Proto::Tcp, &[a, b]);
        let v = vip(&conf);
        let before = v.backends();
        conf.backends = cfg(conf.addr, Proto::Tcp, &[b, c]).backends;
        v.apply(conf.clone()).unwrap();
        let after = v.backends();
        assert!(Arc::ptr_eq(&before[1], &after[0]), "b was replaced");
        assert_eq!(after[1].addr, c);
        assert!(
            !before[0].stats.serving.load(Ordering::Relaxed),
            "a still serving"
        );
        assert!(
            before[0].close_rx().borrow().is_some(),
            "a has no drain deadline"
        );
        // A bad weight is refused and changes nothing.
        conf.backends[0].weight = 1000;
        assert!(v.apply(conf).is_err());
        assert!(Arc::ptr_eq(&v.backends()[0], &after[0]));
    }

    #[tokio::test]
    async fn tcp_proxy_sends_proxy_v2_retries_refused_backends_and_counts_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let mut hdr = [0u8; 28];
                    if s.read_exact(&mut hdr).await.is_err() {
                        continue;
                    }
                    let (h, n) = crate::proxy_v2::parse(&hdr).unwrap();
                    assert_eq!(n, 28);
                    seen.lock().unwrap().push(h.addresses().unwrap());
                    let mut ping = [0u8; 4];
                    s.read_exact(&mut ping).await.unwrap();
                    s.write_all(b"pong").await.unwrap();
                }
            });
        }
        let dead = closed_port();
        let listener = crate::proxy::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let vaddr = listener.local_addr().unwrap();
        let mut conf = cfg(vaddr, Proto::Tcp, &[dead, live]);
        conf.proxy_protocol = true;
        let v = vip(&conf);
        tokio::spawn(crate::proxy::serve(v.clone(), listener));
        for _ in 0..4 {
            let mut c = TcpStream::connect(vaddr).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut pong = [0u8; 4];
            c.read_exact(&mut pong).await.unwrap();
            assert_eq!(&pong, b"pong");
            let me = c.local_addr().unwrap();
            assert_eq!(seen.lock().unwrap().last(), Some(&(me, vaddr)));
        }
        let bs = v.backends();
        assert!(!bs[0].is_up(), "the refused backend is still up");
        assert_eq!(BackendStats::get(&bs[0].stats.errors), 1);
        assert_eq!(BackendStats::get(&v.stats.retries), 1);
        assert_eq!(BackendStats::get(&bs[1].stats.total), 4);
        // Counters settle once the connections end.
        for _ in 0..100 {
            if BackendStats::get(&bs[1].stats.active) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(BackendStats::get(&bs[1].stats.active), 0);
        assert_eq!(BackendStats::get(&bs[1].stats.bytes_in), 16);
        assert_eq!(BackendStats::get(&bs[1].stats.bytes_out), 16);
    }

    #[tokio::test]
    async fn udp_flow_answers_from_the_vip_and_expires_when_idle() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let eaddr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let sock = crate::udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let vaddr = sock.local_addr().unwrap();
        let v = vip(&cfg(vaddr, Proto::Udp, &[eaddr]));
        tokio::spawn(crate::udp::serve(
            v.clone(),
            sock,
            Duration::from_millis(200),
        ));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 65536];
        for d in [&b"hi"[..], &b""[..], &vec![7u8; 65_000][..]] {
            client.send_to(d, vaddr).await.unwrap();
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(from, vaddr, "answer not from the VIP");
            assert_eq!(&buf[..n], d);
        }
        let b = &v.backends()[0];
        assert_eq!(BackendStats::get(&b.stats.total), 1, "one flow");
        assert_eq!(BackendStats::get(&b.stats.active), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(BackendStats::get(&b.stats.active), 0, "idle flow kept");
    }
}
