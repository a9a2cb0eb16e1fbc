//! The gateway: how a volume's NBD I/O on this host reaches the volume's replicas.
//!
//! Attaching takes the volume's lease (epoch) from volume-mgr, raises that epoch on every
//! replica it can reach (fencing the previous holder), and makes the in-service replicas of
//! every chunk agree (after a crash of the previous gateway they may differ in writes that
//! were never acknowledged) before the first read.
//!
//! Writes go to every in-service replica of the chunk's set in parallel and are acknowledged
//! only when each of them has the write — a replica that fails is first recorded as out of
//! service in volume-mgr (durably) — and never on fewer than `min_replicas`. Below that,
//! writes wait up to `min_replicas_wait` for replicas to come back and then fail with EIO.
//! Reads come from an in-service replica, this host's own first.
//!
//! Out-of-service replicas that answer again are resynchronised in the background: writes are
//! mirrored to them from a barrier on, every chunk whose (version, digest) differs from an
//! in-service replica's is copied under the chunk's lock, and the replica is recorded as in
//! service again only then. Every write carries a version `epoch << 40 | sequence`, so a
//! newer gateway's writes always sort after an older one's.

use crate::buf::AlignedBuf;
use crate::chunkstore::layout::{BLOCK, SLOT_SIZE};
use crate::chunkstore::rangelock::{RangeGuard, RangeLock};
use crate::export::ExportError;
use crate::replica::client::{ReplicaClient, ReplicaError};
use crate::replica::service::{ReplicaService, ESTALE};
use crate::replica::wire::{self, Chunk, ChunkState};
use crate::uring::Buf;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use volume_mgr::api;
use volume_mgr::client::{Client, ClientError};

const ENOSPC: u32 = 28;
const EIO: u32 = 5;
/// Lock stripes per attached volume (chunk index modulo this); block ranges within a stripe.
const STRIPES: usize = 1024;
const BLOCKS: u32 = (SLOT_SIZE / BLOCK) as u32;

pub struct GatewayConfig {
    /// This host's node name (its own replica is used without a socket).
    pub node: String,
    /// Longest wait for a replica's answer (and for connecting to it).
    pub replica_timeout: Duration,
    /// How long I/O waits for enough in-service replicas before failing with EIO.
    pub min_replicas_wait: Duration,
    /// The cluster secret for the replica protocol (None: only the local replica works).
    pub secret: Option<Vec<u8>>,
    /// Bytes per second of background copies (resync and re-replication); 0 = unlimited.
    pub recovery_bandwidth: u64,
}

#[derive(Default)]
pub struct GatewayMetrics {
    pub replica_failures: AtomicU64,
    pub marked_out: AtomicU64,
    pub readmitted: AtomicU64,
    pub resync_chunks: AtomicU64,
    pub resync_bytes: AtomicU64,
    pub converged_chunks: AtomicU64,
    pub fenced: AtomicU64,
    pub degraded_waits: AtomicU64,
    pub eio_below_min: AtomicU64,
    pub read_retries: AtomicU64,
}

impl GatewayMetrics {
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let m = [
            (
                "replica_failures_total",
                "Replica requests that failed (connection, timeout or error)",
                &self.replica_failures,
            ),
            (
                "replicas_marked_out_total",
                "Replicas recorded out of service by this gateway",
                &self.marked_out,
            ),
            (
                "replicas_readmitted_total",
                "Replicas resynchronised and recorded in service again",
                &self.readmitted,
            ),
            (
                "resync_chunks_total",
                "Chunks copied to a replica that missed writes",
                &self.resync_chunks,
            ),
            (
                "resync_bytes_total",
                "Bytes copied by resynchronisation",
                &self.resync_bytes,
            ),
            (
                "attach_converged_chunks_total",
                "Chunks whose replicas disagreed at attach and were made equal",
                &self.converged_chunks,
            ),
            (
                "fenced_total",
                "Times this gateway found its lease taken over (I/O refused)",
                &self.fenced,
            ),
            (
                "degraded_waits_total",
                "I/O that waited for enough in-service replicas",
                &self.degraded_waits,
            ),
            (
                "below_min_replicas_errors_total",
                "I/O failed with EIO because fewer than min_replicas were in service",
                &self.eio_below_min,
            ),
            (
                "read_retries_total",
                "Reads retried on another replica",
                &self.read_retries,
            ),
        ];
        for (name, help, v) in m {
            let _ = writeln!(
                out,
                "# HELP fabric_gateway_{name} {help}\n# TYPE fabric_gateway_{name} counter\nfabric_gateway_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// A way to one replica: this host's chunk store, or a connection to a peer.
#[derive(Clone)]
pub enum Replica {
    Local(Arc<ReplicaService>),
    Remote(Arc<ReplicaClient>),
}

/// What a write-like request does to a chunk.
pub enum Op {
    Write {
        off: u32,
        data: Arc<AlignedBuf>,
        pos: usize,
        len: usize,
        fua: bool,
    },
    Zero {
        off: u32,
        len: u32,
        punch: bool,
        fua: bool,
    },
}

impl Op {
    fn blocks(&self) -> (u32, u32) {
        let (off, len) = match self {
            Op::Write { off, len, .. } => (*off as u64, *len as u64),
            Op::Zero { off, len, .. } => (*off as u64, *len as u64),
        };
        ((off / BLOCK) as u32, (off + len).div_ceil(BLOCK) as u32)
    }
}

impl Replica {
    pub async fn read(
        &self,
        chunk: Chunk,
        off: u32,
        len: u32,
        epoch: u64,
        mut buf: AlignedBuf,
        pos: usize,
    ) -> (AlignedBuf, Result<(), ReplicaError>) {
        match self {
            Replica::Local(s) => {
                let (b, r) = s.read_into(chunk, off, len, epoch, buf, pos).await;
                (b, r.map(|_| ()).map_err(ReplicaError::Status))
            }
            Replica::Remote(c) => match c.read(chunk, off, len, epoch).await {
                Ok((_, d)) => {
                    buf.full_mut()[pos..pos + len as usize].copy_from_slice(&d);
                    (buf, Ok(()))
                }
                Err(e) => (buf, Err(e)),
            },
        }
    }

    async fn apply(
        &self,
        chunk: Chunk,
        op: &Op,
        epoch: u64,
        version: u64,
    ) -> Result<(), ReplicaError> {
        match (self, op) {
            (
                Replica::Local(s),
                Op::Write {
                    off,
                    data,
                    pos,
                    len,
                    fua,
                },
            ) => s
                .write(
                    chunk,
                    *off,
                    Buf::Shared(data.clone()),
                    *pos,
                    *len,
                    epoch,
                    version,
                    *fua,
                )
                .await
                .map(|_| ())
                .map_err(ReplicaError::Status),
            (
                Replica::Remote(c),
                Op::Write {
                    off,
                    data,
                    pos,
                    len,
                    fua,
                },
            ) => c
                .write(chunk, *off, &data[*pos..*pos + *len], epoch, version, *fua)
                .await
                .map(|_| ()),
            (
                Replica::Local(s),
                Op::Zero {
                    off,
                    len,
                    punch,
                    fua,
                },
            ) => s
                .zero(chunk, *off, *len, epoch, version, *punch, *fua)
                .await
                .map(|_| ())
                .map_err(ReplicaError::Status),
            (
                Replica::Remote(c),
                Op::Zero {
                    off,
                    len,
                    punch,
                    fua,
                },
            ) => c
                .zero(chunk, *off, *len, epoch, version, *punch, *fua)
                .await
                .map(|_| ()),
        }
    }

    pub async fn flush(&self, volume: u64, epoch: u64) -> Result<(), ReplicaError> {
        match self {
            Replica::Local(s) => s
                .flush(Some(volume), epoch)
                .await
                .map_err(ReplicaError::Status),
            Replica::Remote(c) => c.flush(volume, epoch).await,
        }
    }

    /// Every chunk state of a volume held there, by index.
    pub async fn versions(
        &self,
        volume: u64,
        epoch: u64,
    ) -> Result<HashMap<u64, ChunkState>, ReplicaError> {
        let list = match self {
            Replica::Local(s) => {
                let mut out = Vec::new();
                let mut start = 0;
                loop {
                    let (e, next) = s
                        .versions(volume, start, epoch)
                        .map_err(ReplicaError::Status)?;
                    out.extend(e);
                    if next == wire::END {
                        break out;
                    }
                    start = next;
                }
            }
            Replica::Remote(c) => c.versions(volume, epoch).await?,
        };
        Ok(list.into_iter().map(|s| (s.index, s)).collect())
    }

    pub async fn checksums(&self, chunk: Chunk) -> Result<(u64, Vec<u32>), ReplicaError> {
        match self {
            Replica::Local(s) => Ok(s.checksums(chunk)),
            Replica::Remote(c) => c.checksums(chunk).await,
        }
    }

    pub async fn fetch(&self, chunk: Chunk, epoch: u64) -> Result<(u64, Vec<u8>), ReplicaError> {
        match self {
            Replica::Local(s) => s.fetch(chunk, epoch).await.map_err(ReplicaError::Status),
            Replica::Remote(c) => c.fetch(chunk, epoch).await,
        }
    }

    pub async fn install(
        &self,
        chunk: Chunk,
        epoch: u64,
        version: u64,
        image: &[u8],
    ) -> Result<(), ReplicaError> {
        match self {
            Replica::Local(s) => s
                .install(chunk, epoch, version, image)
                .await
                .map_err(ReplicaError::Status),
            Replica::Remote(c) => c.install(chunk, epoch, version, image).await,
        }
    }
}

#[derive(Default)]
struct PeerSlot {
    conn: Option<Arc<ReplicaClient>>,
    last_fail: Option<Instant>,
}

/// Shared by every volume this gateway serves: configuration, the manager client, this
/// host's replica service and the pool of connections to peers (one per peer, pipelined).
pub struct Ctx {
    pub cfg: GatewayConfig,
    pub client: Client,
    pub local: Arc<ReplicaService>,
    peers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<PeerSlot>>>>,
    pub metrics: GatewayMetrics,
    /// `--recovery-bandwidth`: every background copy of this daemon takes from it.
    pub throttle: crate::throttle::Throttle,
    /// Bytes copied by resync per volume (by name), reported to volume-mgr.
    copied: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// A connection attempt that failed is not retried for this long (the background resync
/// retries; I/O does not pile up behind a dead peer).
const RECONNECT_AFTER: Duration = Duration::from_millis(1000);

impl Ctx {
    pub fn new(cfg: GatewayConfig, client: Client, local: Arc<ReplicaService>) -> Arc<Ctx> {
        Arc::new(Ctx {
            throttle: crate::throttle::Throttle::new(cfg.recovery_bandwidth),
            copied: Mutex::new(Default::default()),
            cfg,
            client,
            local,
            peers: Mutex::new(HashMap::new()),
            metrics: GatewayMetrics::default(),
        })
    }

    /// The replica on `node`: local, a live pooled connection, or a new one.
    pub async fn replica(&self, node: &str) -> Result<Replica, ReplicaError> {
        if node == self.cfg.node {
            return Ok(Replica::Local(self.local.clone()));
        }
        let slot = self
            .peers
            .lock()
            .unwrap()
            .entry(node.to_string())
            .or_default()
            .clone();
        let mut g = slot.lock().await;
        if let Some(c) = &g.conn {
            if !c.is_closed() {
                return Ok(Replica::Remote(c.clone()));
            }
        }
        g.conn = None;
        if g.last_fail.is_some_and(|t| t.elapsed() < RECONNECT_AFTER) {
            return Err(ReplicaError::Down(format!("{node} unreachable")));
        }
        match self.connect(node).await {
            Ok(c) => {
                let c = Arc::new(c);
                g.conn = Some(c.clone());
                g.last_fail = None;
                tracing::info!(peer = node, "connected to replica");
                Ok(Replica::Remote(c))
            }
            Err(e) => {
                g.last_fail = Some(Instant::now());
                tracing::debug!(peer = node, error = %e, "cannot connect to replica");
                Err(ReplicaError::Down(format!("{node}: {e}")))
            }
        }
    }

    async fn connect(&self, node: &str) -> Result<ReplicaClient, String> {
        let secret = self.cfg.secret.as_ref().ok_or(
            "no cluster secret configured (blockd --secret-file): cannot reach other hosts",
        )?;
        let n = tokio::time::timeout(self.cfg.replica_timeout, self.client.get_node(node))
            .await
            .map_err(|_| "volume-mgr did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        let cluster = self.local.store.cluster_id();
        ReplicaClient::connect_timeout(
            &n.address,
            &cluster,
            &self.cfg.node,
            secret,
            self.cfg.replica_timeout,
        )
        .await
        .map_err(|e| format!("{}: {e}", n.address))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Healthy as far as this gateway knows.
    Ok,
    /// A request to it failed; if the record still has it in service, it is being marked out.
    Failed,
    /// Out of service, being resynchronised: receives every write, serves no reads.
    Syncing,
}

#[derive(Debug, Clone)]
struct Member {
    node: String,
    /// volume-mgr's record: in service (has every acknowledged write).
    record_in: bool,
    st: St,
}

/// One attachment of a volume: the lease epoch and the live replica state.
pub struct Attached {
    ctx: Arc<Ctx>,
    pub name: String,
    pub id: u64,
    pub epoch: u64,
    nsets: u64,
    min_replicas: usize,
    seq: AtomicU64,
    sets: Mutex<Vec<Vec<Member>>>,
    changed: Notify,
    locks: Vec<RangeLock>,
    fenced: AtomicBool,
    closed: AtomicBool,
    marking: Mutex<BTreeSet<String>>,
    /// Bumped by every record this gateway applies from its own updates: a polled record
    /// read before one of those is older and is dropped.
    record_gen: AtomicU64,
}

pub fn chunk_of(id: u64, index: u64) -> Chunk {
    Chunk { volume: id, index }
}

fn empty_state(index: u64) -> ChunkState {
    ChunkState {
        index,
        version: 0,
        digest: wire::empty_digest(),
    }
}

/// Whether two replicas' copies of a chunk agree: same content and version; an empty chunk
/// equals an absent one whatever its version (a discard never allocates to record one).
fn same(a: &ChunkState, b: &ChunkState) -> bool {
    a.digest == b.digest && (a.version == b.version || a.digest == wire::empty_digest())
}

fn below_min(msg: String) -> ExportError {
    ExportError::Io(std::io::Error::other(msg))
}

fn fenced_err() -> ExportError {
    ExportError::Fenced
}

fn is_stale_lease(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { code, .. } if code == "stale_lease")
}

impl Attached {
    /// Takes the lease and brings the replicas to agreement; see the module docs.
    pub async fn attach(
        ctx: Arc<Ctx>,
        name: &str,
        expect_id: u64,
    ) -> Result<Arc<Attached>, String> {
        let node = ctx.cfg.node.clone();
        let lease = ctx
            .client
            .acquire_lease(name, &node)
            .await
            .map_err(|e| format!("taking the lease of {name}: {e}"))?;
        let vol = ctx
            .client
            .get_volume(name)
            .await
            .map_err(|e| format!("reading volume {name}: {e}"))?;
        if vol.id != expect_id {
            return Err(format!("volume {name} was re-created (id {} now)", vol.id));
        }
        if vol.sets.is_empty() {
            return Err(format!(
                "volume {name} has no replica placement (created before replication); re-create it"
            ));
        }
        let sets: Vec<Vec<Member>> = vol
            .sets
            .iter()
            .map(|s| {
                s.members
                    .iter()
                    .map(|m| Member {
                        node: m.node.clone(),
                        record_in: m.in_service,
                        st: St::Ok,
                    })
                    .collect()
            })
            .collect();
        let att = Arc::new(Attached {
            ctx: ctx.clone(),
            name: name.to_string(),
            id: vol.id,
            epoch: lease.epoch,
            nsets: sets.len() as u64,
            min_replicas: (vol.min_replicas.max(1) as usize).min(vol.replicas.max(1) as usize),
            seq: AtomicU64::new(0),
            sets: Mutex::new(sets),
            changed: Notify::new(),
            locks: (0..STRIPES).map(|_| RangeLock::default()).collect(),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            marking: Mutex::new(BTreeSet::new()),
            record_gen: AtomicU64::new(0),
        });
        let max_version = att.converge().await?;
        att.seq
            .store((att.epoch << 40).max(max_version + 1), Ordering::Release);
        tokio::spawn(resync_loop(Arc::downgrade(&att)));
        tokio::spawn(record_loop(Arc::downgrade(&att)));
        tracing::info!(volume = name, epoch = att.epoch, "attached");
        Ok(att)
    }

    /// Raises our epoch on every member, marks unreachable in-service members out, and makes
    /// the in-service replicas of every chunk equal (the highest version wins). Returns the
    /// highest chunk version seen anywhere.
    async fn converge(self: &Arc<Self>) -> Result<u64, String> {
        let nodes: BTreeSet<String> = self
            .sets
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|m| m.node.clone())
            .collect();
        let mut snaps: HashMap<String, HashMap<u64, ChunkState>> = HashMap::new();
        let results = futures::future::join_all(nodes.iter().map(|n| async move {
            let r = match self.ctx.replica(n).await {
                Ok(r) => r.versions(self.id, self.epoch).await,
                Err(e) => Err(e),
            };
            (n.clone(), r)
        }))
        .await;
        let mut max_version = 0;
        for (n, r) in results {
            match r {
                Ok(s) => {
                    max_version = s
                        .values()
                        .map(|c| c.version)
                        .max()
                        .unwrap_or(0)
                        .max(max_version);
                    snaps.insert(n, s);
                }
                Err(ReplicaError::Status(ESTALE)) => {
                    return Err(format!(
                        "the lease of {} moved to a newer holder while attaching",
                        self.name
                    ))
                }
                Err(e) => {
                    tracing::warn!(volume = %self.name, replica = %n, error = %e, "replica unreachable at attach");
                    self.fail(&n);
                }
            }
        }
        // Chunks on which the reachable in-service replicas disagree.
        let sets = self.sets.lock().unwrap().clone();
        for (s, members) in sets.iter().enumerate() {
            let good: Vec<&str> = members
                .iter()
                .filter(|m| m.record_in && snaps.contains_key(&m.node))
                .map(|m| m.node.as_str())
                .collect();
            if good.len() < 2 {
                continue;
            }
            let mut indices = BTreeSet::new();
            for n in &good {
                indices.extend(
                    snaps[*n]
                        .keys()
                        .filter(|i| *i % self.nsets == s as u64)
                        .copied(),
                );
            }
            for idx in indices {
                let st = |n: &str| snaps[n].get(&idx).copied().unwrap_or(empty_state(idx));
                let first = st(good[0]);
                if good.iter().all(|n| same(&st(n), &first)) {
                    continue;
                }
                // The newest state wins (ties: the larger digest, then the node name, so any
                // gateway would pick the same one).
                let best = *good
                    .iter()
                    .max_by_key(|n| {
                        let c = st(n);
                        (c.version, c.digest, std::cmp::Reverse(n.to_string()))
                    })
                    .unwrap();
                let others: Vec<&str> = good
                    .iter()
                    .copied()
                    .filter(|n| !same(&st(n), &st(best)))
                    .collect();
                tracing::info!(volume = %self.name, chunk = idx, source = best, targets = ?others, "replicas disagree after the previous gateway stopped; making them equal");
                self.copy_chunk(idx, best, &others)
                    .await
                    .map_err(|e| format!("making chunk {idx} of {} agree: {e}", self.name))?;
                self.ctx
                    .metrics
                    .converged_chunks
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        for n in nodes {
            if snaps.contains_key(&n) {
                if let Ok(r) = self.ctx.replica(&n).await {
                    if let Err(e) = r.flush(self.id, self.epoch).await {
                        tracing::warn!(replica = %n, error = %e, "flush at attach failed");
                        self.fail(&n);
                    }
                }
            }
        }
        Ok(max_version)
    }

    /// Copies chunk `idx` from `src` to each of `dsts` (the caller holds the chunk's lock or
    /// no I/O runs yet). A failed target is marked failed; a failed source fails the copy.
    async fn copy_chunk(
        self: &Arc<Self>,
        idx: u64,
        src: &str,
        dsts: &[&str],
    ) -> Result<(), String> {
        let chunk = chunk_of(self.id, idx);
        let s = self.ctx.replica(src).await.map_err(|e| e.to_string())?;
        let (version, image) = match s.fetch(chunk, self.epoch).await {
            Ok(x) => x,
            Err(e) => {
                self.fail(src);
                return Err(format!("reading it from {src}: {e}"));
            }
        };
        for d in dsts {
            let r = match self.ctx.replica(d).await {
                Ok(r) => r.install(chunk, self.epoch, version, &image).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    self.ctx
                        .metrics
                        .resync_chunks
                        .fetch_add(1, Ordering::Relaxed);
                    self.ctx
                        .metrics
                        .resync_bytes
                        .fetch_add(image.len() as u64, Ordering::Relaxed);
                }
                Err(ReplicaError::Status(ESTALE)) => {
                    self.fence();
                    return Err("fenced: the lease moved to another host".into());
                }
                Err(e) => {
                    tracing::warn!(replica = d, chunk = idx, error = %e, "installing a chunk failed");
                    self.fail(d);
                }
            }
        }
        Ok(())
    }

    fn fence(&self) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            self.ctx.metrics.fenced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(volume = %self.name, epoch = self.epoch, "lease taken over by another host: refusing all I/O on this attachment");
        }
        self.changed.notify_waiters();
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Stops the background work (the volume was removed or the daemon stops).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// A request to `node` failed: stop using it; if the record still counts it in service,
    /// record it out (in the background; acknowledgements wait for that).
    fn fail(self: &Arc<Self>, node: &str) {
        self.ctx
            .metrics
            .replica_failures
            .fetch_add(1, Ordering::Relaxed);
        let mut need_mark = false;
        let mut newly = false;
        {
            let mut sets = self.sets.lock().unwrap();
            for m in sets.iter_mut().flatten().filter(|m| m.node == node) {
                newly |= m.st != St::Failed;
                m.st = St::Failed;
                need_mark |= m.record_in;
            }
        }
        if newly {
            tracing::warn!(volume = %self.name, replica = node, "replica failed");
        }
        if need_mark {
            self.spawn_mark_out(node);
        }
        self.changed.notify_waiters();
    }

    fn spawn_mark_out(self: &Arc<Self>, node: &str) {
        if !self.marking.lock().unwrap().insert(node.to_string()) {
            return;
        }
        let this = self.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                if this.is_fenced() || this.closed.load(Ordering::Acquire) {
                    break;
                }
                let req = api::ReplicaUpdate {
                    epoch: this.epoch,
                    node: node.clone(),
                    in_service: false,
                    sets: None,
                };
                match this.ctx.client.update_replicas(&this.name, &req).await {
                    Ok(v) => {
                        this.ctx.metrics.marked_out.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(volume = %this.name, replica = %node, "replica recorded out of service (degraded)");
                        this.apply_record(&v);
                        break;
                    }
                    Err(e) if is_stale_lease(&e) => {
                        this.fence();
                        break;
                    }
                    Err(ClientError::Api { code, .. }) if code == "invalid_argument" => {
                        // The manager re-homed its replicas meanwhile: nothing to record; the
                        // record without it is applied at once (writes wait for it).
                        tracing::info!(volume = %this.name, replica = %node, "replica no longer in the volume's record");
                        this.refresh_record().await;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(volume = %this.name, replica = %node, error = %e, "cannot record replica out of service yet; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
            this.marking.lock().unwrap().remove(&node);
            this.changed.notify_waiters();
        });
    }

    fn apply_record(&self, v: &api::Volume) {
        self.record_gen.fetch_add(1, Ordering::AcqRel);
        let mut sets = self.sets.lock().unwrap();
        for (s, rec) in sets.iter_mut().zip(&v.sets) {
            for m in s.iter_mut() {
                if let Some(r) = rec.members.iter().find(|r| r.node == m.node) {
                    m.record_in = r.in_service;
                }
            }
        }
        drop(sets);
        self.changed.notify_waiters();
    }

    /// Follows membership changes the manager made (re-replication): a member that left the
    /// record is dropped (no more writes or reads go to it); a new member, recorded out of
    /// service, starts as one to resynchronise, so the resync loop mirrors writes to it from
    /// a barrier on, copies the chunks that differ by version and digest, and only then
    /// records it in service (see `resync_sets`). Returns whether anything changed.
    pub fn sync_record(&self, v: &api::Volume) -> bool {
        if v.id != self.id || v.sets.len() as u64 != self.nsets {
            return false;
        }
        let mut changed = false;
        let mut sets = self.sets.lock().unwrap();
        for (s, (cur, rec)) in sets.iter_mut().zip(&v.sets).enumerate() {
            let mut next = Vec::with_capacity(rec.members.len());
            for r in &rec.members {
                match cur.iter().find(|m| m.node == r.node) {
                    Some(m) => {
                        let mut m = m.clone();
                        changed |= m.record_in != r.in_service;
                        m.record_in = r.in_service;
                        next.push(m);
                    }
                    None => {
                        changed = true;
                        tracing::info!(volume = %self.name, set = s, replica = %r.node, "new replica in the volume's record: copying to it before it serves");
                        next.push(Member {
                            node: r.node.clone(),
                            record_in: r.in_service,
                            st: if r.in_service { St::Ok } else { St::Failed },
                        });
                    }
                }
            }
            for m in cur
                .iter()
                .filter(|m| !next.iter().any(|n| n.node == m.node))
            {
                changed = true;
                tracing::info!(volume = %self.name, set = s, replica = %m.node, "replica left the volume's record (re-homed)");
            }
            *cur = next;
        }
        drop(sets);
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// Drops the members that `v`'s record no longer lists (and nothing else: unlike
    /// [`sync_record`](Self::sync_record) it never changes in/out-of-service states, which a
    /// read older than this gateway's own updates could roll back). For the agent, before it
    /// deletes this host's chunks of sets re-homed away.
    pub fn forget_left_members(&self, v: &api::Volume) {
        if v.id != self.id || v.sets.len() as u64 != self.nsets {
            return;
        }
        let mut changed = false;
        let mut sets = self.sets.lock().unwrap();
        for (s, (cur, rec)) in sets.iter_mut().zip(&v.sets).enumerate() {
            let before = cur.len();
            cur.retain(|m| rec.members.iter().any(|r| r.node == m.node));
            if cur.len() != before {
                changed = true;
                tracing::info!(volume = %self.name, set = s, "replicas that left the record dropped before their chunks are deleted");
            }
        }
        drop(sets);
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Reads the volume's record and applies membership changes (dropped when one of this
    /// gateway's own updates landed meanwhile: the read may predate it).
    async fn refresh_record(&self) {
        let gen = self.record_gen.load(Ordering::Acquire);
        if let Ok(v) = self.ctx.client.get_volume(&self.name).await {
            if self.record_gen.load(Ordering::Acquire) == gen {
                self.sync_record(&v);
            }
        }
    }

    /// Whether this host's replica of chunk `idx` is an up-to-date one.
    pub fn local_in_service(&self, idx: u64) -> bool {
        let sets = self.sets.lock().unwrap();
        sets[self.set_of(idx)]
            .iter()
            .any(|m| m.node == self.ctx.cfg.node && m.record_in && m.st == St::Ok)
    }

    fn set_of(&self, idx: u64) -> usize {
        (idx % self.nsets) as usize
    }

    fn stripe(&self, idx: u64) -> &RangeLock {
        &self.locks[(idx % STRIPES as u64) as usize]
    }

    async fn lock(
        &self,
        idx: u64,
        b0: u32,
        b1: u32,
        excl: bool,
    ) -> Result<RangeGuard<'_>, ExportError> {
        self.stripe(idx)
            .lock(b0, b1, excl)
            .await
            .map_err(|_| ExportError::Shutdown)
    }

    fn check(&self) -> Result<(), ExportError> {
        if self.is_fenced() {
            return Err(fenced_err());
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(ExportError::Shutdown);
        }
        Ok(())
    }

    /// Waits for a change of replica state or a short while; EIO once `deadline` passed.
    async fn wait_change(&self, deadline: Instant, why: &str) -> Result<(), ExportError> {
        let now = Instant::now();
        if now >= deadline {
            self.ctx
                .metrics
                .eio_below_min
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(volume = %self.name, "I/O failed: {why} for {:?}", self.ctx.cfg.min_replicas_wait);
            return Err(below_min(format!(
                "{why} (waited {:?})",
                self.ctx.cfg.min_replicas_wait
            )));
        }
        let wait = (deadline - now).min(Duration::from_millis(200));
        let _ = tokio::time::timeout(wait, self.changed.notified()).await;
        Ok(())
    }

    /// Writes (or zeroes) within chunk `idx` on every replica that must have it.
    pub async fn replicate(self: &Arc<Self>, idx: u64, op: Op) -> Result<(), ExportError> {
        let (b0, b1) = op.blocks();
        let s = self.set_of(idx);
        let chunk = chunk_of(self.id, idx);
        let deadline = Instant::now() + self.ctx.cfg.min_replicas_wait;
        let mut waited = false;
        loop {
            self.check()?;
            // Overlapping writes are ordered here, so every replica applies them in the same
            // order. The lock is not held while waiting for replicas (a resync needs it).
            let _g = self.lock(idx, b0, b1, true).await?;
            let (targets, in_ok, in_all) = {
                let sets = self.sets.lock().unwrap();
                let m = &sets[s];
                let targets: Vec<String> = m
                    .iter()
                    .filter(|x| (x.record_in && x.st == St::Ok) || x.st == St::Syncing)
                    .map(|x| x.node.clone())
                    .collect();
                let in_ok = m.iter().filter(|x| x.record_in && x.st == St::Ok).count();
                let in_all = m.iter().filter(|x| x.record_in).count();
                (targets, in_ok, in_all)
            };
            if in_ok < self.min_replicas || in_ok < in_all {
                drop(_g);
                if !waited {
                    waited = true;
                    self.ctx
                        .metrics
                        .degraded_waits
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.wait_change(
                    deadline,
                    &format!(
                        "{in_ok} of {} replicas of chunk {idx} in service, need {}",
                        self.sets.lock().unwrap()[s].len(),
                        self.min_replicas
                    ),
                )
                .await?;
                continue;
            }
            let version = self.seq.fetch_add(1, Ordering::AcqRel);
            let results = futures::future::join_all(targets.iter().map(|n| {
                let op = &op;
                async move {
                    match self.ctx.replica(n).await {
                        Ok(r) => r.apply(chunk, op, self.epoch, version).await,
                        Err(e) => Err(e),
                    }
                }
            }))
            .await;
            let mut ok = Vec::new();
            let mut nospace = false;
            for (n, r) in targets.iter().zip(results) {
                match r {
                    Ok(()) => ok.push(n.clone()),
                    Err(ReplicaError::Status(ESTALE)) => {
                        self.fence();
                        return Err(fenced_err());
                    }
                    Err(ReplicaError::Status(ENOSPC)) => nospace = true,
                    Err(e) => {
                        tracing::warn!(volume = %self.name, replica = %n, chunk = idx, error = %e, "write to replica failed");
                        self.fail(n);
                    }
                }
            }
            if nospace {
                return Err(ExportError::NoSpace);
            }
            if ok.len() == targets.len() {
                return Ok(());
            }
            // Acknowledge only once every replica still recorded in service has the write.
            loop {
                self.check()?;
                let (done, pending) = {
                    let sets = self.sets.lock().unwrap();
                    let m = &sets[s];
                    let missing: Vec<&Member> = m
                        .iter()
                        .filter(|x| x.record_in && !ok.contains(&x.node))
                        .collect();
                    let have = m
                        .iter()
                        .filter(|x| x.record_in && ok.contains(&x.node))
                        .count();
                    let marking = self.marking.lock().unwrap();
                    (
                        missing.is_empty() && have >= self.min_replicas,
                        missing.iter().any(|x| marking.contains(&x.node)),
                    )
                };
                if done {
                    return Ok(());
                }
                if !pending {
                    break; // retry the write on whatever is in service now
                }
                self.wait_change(deadline, "recording a failed replica out of service")
                    .await?;
            }
        }
    }

    /// Reads `len` bytes at `off` of chunk `idx` into `buf[pos..]` from an in-service replica.
    pub async fn read(
        self: &Arc<Self>,
        idx: u64,
        off: u32,
        len: u32,
        mut buf: AlignedBuf,
        pos: usize,
    ) -> (AlignedBuf, Result<(), ExportError>) {
        let b0 = (off as u64 / BLOCK) as u32;
        let b1 = (off as u64 + len as u64).div_ceil(BLOCK) as u32;
        let s = self.set_of(idx);
        let chunk = chunk_of(self.id, idx);
        let deadline = Instant::now() + self.ctx.cfg.min_replicas_wait;
        let mut corrupt = false;
        loop {
            if let Err(e) = self.check() {
                return (buf, Err(e));
            }
            let g = match self.lock(idx, b0, b1, false).await {
                Ok(g) => g,
                Err(e) => return (buf, Err(e)),
            };
            let mut cands: Vec<String> = {
                let sets = self.sets.lock().unwrap();
                sets[s]
                    .iter()
                    .filter(|x| x.record_in && x.st == St::Ok)
                    .map(|x| x.node.clone())
                    .collect()
            };
            // Our own disks first.
            cands.sort_by_key(|n| *n != self.ctx.cfg.node);
            for n in &cands {
                let r = match self.ctx.replica(n).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.fail(n);
                        continue;
                    }
                };
                let (b, res) = r.read(chunk, off, len, self.epoch, buf, pos).await;
                buf = b;
                match res {
                    Ok(()) => return (buf, Ok(())),
                    Err(ReplicaError::Status(ESTALE)) => {
                        self.fence();
                        return (buf, Err(fenced_err()));
                    }
                    Err(ReplicaError::Status(EIO)) => {
                        // A bad checksum there: try another copy.
                        corrupt = true;
                        self.ctx
                            .metrics
                            .read_retries
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(volume = %self.name, replica = %n, chunk = idx, "read failed there (checksum or disk error); trying another replica");
                    }
                    Err(e) => {
                        self.ctx
                            .metrics
                            .read_retries
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(volume = %self.name, replica = %n, chunk = idx, error = %e, "read from replica failed");
                        self.fail(n);
                    }
                }
            }
            if corrupt && !cands.is_empty() {
                return (
                    buf,
                    Err(ExportError::Corrupt {
                        offset: idx * SLOT_SIZE + off as u64,
                    }),
                );
            }
            drop(g);
            if let Err(e) = self
                .wait_change(
                    deadline,
                    &format!("no in-service replica of chunk {idx} reachable"),
                )
                .await
            {
                return (buf, Err(e));
            }
        }
    }

    /// Makes every acknowledged write durable on every in-service replica.
    pub async fn flush(self: &Arc<Self>) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.ctx.cfg.min_replicas_wait;
        loop {
            self.check()?;
            let (targets, ready) = {
                let sets = self.sets.lock().unwrap();
                let mut t = BTreeSet::new();
                let mut ready = true;
                for m in sets.iter() {
                    let in_ok = m.iter().filter(|x| x.record_in && x.st == St::Ok).count();
                    let in_all = m.iter().filter(|x| x.record_in).count();
                    ready &= in_ok >= self.min_replicas && in_ok == in_all;
                    t.extend(
                        m.iter()
                            .filter(|x| (x.record_in && x.st == St::Ok) || x.st == St::Syncing)
                            .map(|x| x.node.clone()),
                    );
                }
                (t, ready)
            };
            if !ready {
                self.wait_change(deadline, "fewer than min_replicas replicas in service")
                    .await?;
                continue;
            }
            let results = futures::future::join_all(targets.iter().map(|n| async move {
                match self.ctx.replica(n).await {
                    Ok(r) => r.flush(self.id, self.epoch).await,
                    Err(e) => Err(e),
                }
            }))
            .await;
            let mut all_ok = true;
            for (n, r) in targets.iter().zip(results) {
                match r {
                    Ok(()) => {}
                    Err(ReplicaError::Status(ESTALE)) => {
                        self.fence();
                        return Err(fenced_err());
                    }
                    Err(e) => {
                        tracing::warn!(volume = %self.name, replica = %n, error = %e, "flush on replica failed");
                        self.fail(n);
                        all_ok = false;
                    }
                }
            }
            if all_ok {
                return Ok(());
            }
            // A replica failed mid-flush: once it is recorded out, flush the rest again.
        }
    }

    /// Nodes recorded out of service somewhere and not being resynchronised.
    fn out_nodes(&self) -> BTreeSet<String> {
        self.sets
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .filter(|m| !m.record_in && m.st != St::Syncing)
            .map(|m| m.node.clone())
            .collect()
    }

    /// A member still recorded in service that failed but could not be marked out (it was
    /// the last in-service copy of some set): once reachable it is trusted again.
    fn revive_last_copies(self: &Arc<Self>, node: &str) {
        let mut sets = self.sets.lock().unwrap();
        let mut revived = false;
        for m in sets.iter_mut() {
            let others_in = m.iter().filter(|x| x.record_in && x.node != node).count();
            if let Some(x) = m.iter_mut().find(|x| x.node == node) {
                if x.record_in && x.st == St::Failed && others_in == 0 {
                    x.st = St::Ok;
                    revived = true;
                }
            }
        }
        drop(sets);
        if revived {
            tracing::info!(volume = %self.name, replica = node, "last in-service copy reachable again");
            self.changed.notify_waiters();
        }
    }

    /// Brings an out-of-service replica back: mirror writes from a barrier on, copy every
    /// chunk that differs from an in-service replica, then record it in service.
    async fn resync_node(self: &Arc<Self>, node: &str) -> Result<usize, String> {
        let target = self.ctx.replica(node).await.map_err(|e| e.to_string())?;
        let my_sets: Vec<usize> = {
            let mut sets = self.sets.lock().unwrap();
            let mut v = Vec::new();
            for (s, m) in sets.iter_mut().enumerate() {
                if let Some(x) = m.iter_mut().find(|x| x.node == node) {
                    if !x.record_in && x.st != St::Syncing {
                        x.st = St::Syncing;
                        v.push(s);
                    }
                }
            }
            v
        };
        if my_sets.is_empty() {
            return Ok(0);
        }
        tracing::info!(volume = %self.name, replica = node, sets = my_sets.len(), "resynchronising replica");
        let r = self.resync_sets(node, &target, &my_sets).await;
        if let Err(e) = &r {
            let mut sets = self.sets.lock().unwrap();
            for s in &my_sets {
                if let Some(x) = sets[*s].iter_mut().find(|x| x.node == node) {
                    if x.st == St::Syncing {
                        x.st = St::Failed;
                    }
                }
            }
            tracing::warn!(volume = %self.name, replica = node, error = %e, "resync stopped; will retry");
        }
        r
    }

    async fn resync_sets(
        self: &Arc<Self>,
        node: &str,
        target: &Replica,
        my_sets: &[usize],
    ) -> Result<usize, String> {
        // Barrier: every write that started before the target was Syncing finishes first;
        // every later one is mirrored to it.
        for l in &self.locks {
            drop(l.lock(0, BLOCKS, true).await.map_err(|_| "closed")?);
        }
        let tsnap = target
            .versions(self.id, self.epoch)
            .await
            .map_err(|e| format!("{node}: {e}"))?;
        let mut ssnaps: HashMap<String, HashMap<u64, ChunkState>> = HashMap::new();
        let mut copied = 0usize;
        for &s in my_sets {
            let src = {
                let sets = self.sets.lock().unwrap();
                let mut c: Vec<String> = sets[s]
                    .iter()
                    .filter(|x| x.record_in && x.st == St::Ok)
                    .map(|x| x.node.clone())
                    .collect();
                c.sort_by_key(|n| *n != self.ctx.cfg.node);
                c.into_iter().next()
            };
            let Some(src) = src else {
                return Err(format!("set {s} has no in-service replica to copy from"));
            };
            if !ssnaps.contains_key(&src) {
                let r = self.ctx.replica(&src).await.map_err(|e| e.to_string())?;
                let snap = r
                    .versions(self.id, self.epoch)
                    .await
                    .map_err(|e| format!("{src}: {e}"))?;
                ssnaps.insert(src.clone(), snap);
            }
            let ssnap = &ssnaps[&src];
            let mut indices: BTreeSet<u64> = ssnap
                .keys()
                .filter(|i| *i % self.nsets == s as u64)
                .copied()
                .collect();
            indices.extend(tsnap.keys().filter(|i| *i % self.nsets == s as u64));
            for idx in indices {
                let a = ssnap.get(&idx).copied().unwrap_or(empty_state(idx));
                let b = tsnap.get(&idx).copied().unwrap_or(empty_state(idx));
                if same(&a, &b) {
                    continue;
                }
                // Paid for before the copy (outside the chunk's lock: writes to it do not
                // wait for the throttle), corrected by its real size after.
                const RESERVE: u64 = SLOT_SIZE;
                self.ctx.throttle.reserve(RESERVE).await;
                let _g = self
                    .lock(idx, 0, BLOCKS, true)
                    .await
                    .map_err(|e| e.to_string())?;
                let still = {
                    let sets = self.sets.lock().unwrap();
                    let t_ok = sets[s]
                        .iter()
                        .any(|x| x.node == node && x.st == St::Syncing);
                    let s_ok = sets[s]
                        .iter()
                        .any(|x| x.node == src && x.record_in && x.st == St::Ok);
                    t_ok && s_ok
                };
                if !still {
                    self.ctx.throttle.settle(RESERVE, 0);
                    return Err("replica state changed during resync".into());
                }
                let before = self.ctx.metrics.resync_bytes.load(Ordering::Relaxed);
                let res = self.copy_chunk(idx, &src, &[node]).await;
                copied += 1;
                drop(_g);
                let n = self
                    .ctx
                    .metrics
                    .resync_bytes
                    .load(Ordering::Relaxed)
                    .saturating_sub(before);
                *self
                    .ctx
                    .copied
                    .lock()
                    .unwrap()
                    .entry(self.name.clone())
                    .or_default() += n;
                self.ctx.throttle.settle(RESERVE, n);
                res?;
            }
        }
        target
            .flush(self.id, self.epoch)
            .await
            .map_err(|e| format!("{node}: {e}"))?;
        // Readmit with no write in flight, so none can slip past between the check and the
        // record.
        let mut guards = Vec::with_capacity(self.locks.len());
        for l in &self.locks {
            guards.push(l.lock(0, BLOCKS, true).await.map_err(|_| "closed")?);
        }
        let ok = {
            let sets = self.sets.lock().unwrap();
            my_sets.iter().all(|s| {
                sets[*s]
                    .iter()
                    .any(|x| x.node == node && x.st == St::Syncing)
            })
        };
        if !ok {
            return Err("a mirrored write failed during resync".into());
        }
        let req = api::ReplicaUpdate {
            epoch: self.epoch,
            node: node.to_string(),
            in_service: true,
            sets: Some(my_sets.iter().map(|s| *s as u32).collect()),
        };
        match self.ctx.client.update_replicas(&self.name, &req).await {
            Ok(v) => {
                {
                    let mut sets = self.sets.lock().unwrap();
                    for s in my_sets {
                        if let Some(x) = sets[*s].iter_mut().find(|x| x.node == node) {
                            x.st = St::Ok;
                        }
                    }
                }
                self.apply_record(&v);
                self.ctx.metrics.readmitted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(volume = %self.name, replica = node, chunks = copied, "replica resynchronised and back in service");
                drop(guards);
                Ok(copied)
            }
            Err(e) => {
                if is_stale_lease(&e) {
                    self.fence();
                }
                Err(format!("recording {node} in service: {e}"))
            }
        }
    }
}

/// Background: every second, follow the volume's record (its own task: a long resync must
/// not hold up membership changes, or writes would wait for a member that left).
async fn record_loop(w: Weak<Attached>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(a) = w.upgrade() else { return };
        if a.is_fenced() || a.closed.load(Ordering::Acquire) {
            return;
        }
        a.refresh_record().await;
    }
}

/// Background: every second, try to bring out-of-service replicas back.
async fn resync_loop(w: Weak<Attached>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(a) = w.upgrade() else { return };
        if a.is_fenced() || a.closed.load(Ordering::Acquire) {
            return;
        }
        // Failed members still recorded in service whose marking ended (last copies).
        let stuck: BTreeSet<String> = {
            let sets = a.sets.lock().unwrap();
            let marking = a.marking.lock().unwrap();
            sets.iter()
                .flatten()
                .filter(|m| m.record_in && m.st == St::Failed && !marking.contains(&m.node))
                .map(|m| m.node.clone())
                .collect()
        };
        for n in stuck {
            if let Ok(r) = a.ctx.replica(&n).await {
                if r.versions(a.id, a.epoch).await.is_ok() {
                    a.revive_last_copies(&n);
                }
            }
        }
        for n in a.out_nodes() {
            if a.ctx.replica(&n).await.is_ok() {
                let _ = a.resync_node(&n).await;
            }
        }
    }
}

/// Reports this daemon's copy counter (`resync_bytes`) to volume-mgr once a second while it
/// moves (for `GET /v1/recovery` and `fabctl status`).
pub async fn report_progress(ctx: Arc<Ctx>) {
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = ctx.metrics.resync_bytes.load(Ordering::Relaxed);
        if last == Some(n) {
            continue;
        }
        let p = api::RecoveryProgress {
            copied_bytes: n,
            volumes: ctx.copied.lock().unwrap().clone(),
        };
        match ctx.client.report_recovery(&ctx.cfg.node, &p).await {
            Ok(()) => last = Some(n),
            Err(e) => tracing::debug!(error = %e, "cannot report copy progress"),
        }
    }
}

/// One volume's replica states as `fabctl volume verify` shows them.
pub struct VerifyReport {
    pub chunks_compared: usize,
    pub differences: Vec<String>,
    pub unreachable: Vec<String>,
}

/// Compares every replica's version and digest of every chunk of `vol` (read-only: no lease,
/// no fencing). A chunk differs if any member's state differs from the others'.
pub async fn verify(
    vol: &api::Volume,
    reach: impl Fn(String) -> futures::future::BoxFuture<'static, Result<Replica, ReplicaError>>,
) -> VerifyReport {
    let nsets = vol.sets.len().max(1) as u64;
    let nodes: BTreeSet<String> = vol
        .sets
        .iter()
        .flat_map(|s| s.members.iter().map(|m| m.node.clone()))
        .collect();
    let mut snaps = HashMap::new();
    let mut unreachable = Vec::new();
    for n in nodes {
        let r = match reach(n.clone()).await {
            Ok(r) => r.versions(vol.id, 0).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(s) => {
                snaps.insert(n, s);
            }
            Err(e) => unreachable.push(format!("{n}: {e}")),
        }
    }
    let mut differences = Vec::new();
    let mut compared = 0;
    for (s, set) in vol.sets.iter().enumerate() {
        let members: Vec<&api::Member> = set
            .members
            .iter()
            .filter(|m| snaps.contains_key(&m.node))
            .collect();
        let mut indices = BTreeSet::new();
        for m in &members {
            indices.extend(
                snaps[&m.node]
                    .keys()
                    .filter(|i| *i % nsets == s as u64)
                    .copied(),
            );
        }
        for idx in indices {
            compared += 1;
            let states: Vec<(String, ChunkState)> = members
                .iter()
                .map(|m| {
                    (
                        m.node.clone(),
                        snaps[&m.node]
                            .get(&idx)
                            .copied()
                            .unwrap_or(empty_state(idx)),
                    )
                })
                .collect();
            if states.windows(2).any(|w| !same(&w[0].1, &w[1].1)) {
                let desc: Vec<String> = states
                    .iter()
                    .map(|(n, c)| format!("{n}: version {} digest {:08x}", c.version, c.digest))
                    .collect();
                differences.push(format!(
                    "chunk {idx} (offset {}): {}",
                    idx * SLOT_SIZE,
                    desc.join(", ")
                ));
            }
        }
    }
    VerifyReport {
        chunks_compared: compared,
        differences,
        unreachable,
    }
}

/// `fabctl volume verify`: reads the volume's placement from volume-mgr and compares every
/// replica's chunk states (connecting to each host's replica protocol with the secret).
pub async fn verify_volume(
    client: &Client,
    name: &str,
    secret: &[u8],
    timeout: Duration,
) -> Result<(api::Volume, VerifyReport), String> {
    let vol = client.get_volume(name).await.map_err(|e| e.to_string())?;
    let cluster = client
        .cluster()
        .await
        .map_err(|e| e.to_string())?
        .cluster_id;
    let client2 = client.clone();
    let secret = secret.to_vec();
    let reach =
        move |node: String| -> futures::future::BoxFuture<'static, Result<Replica, ReplicaError>> {
            let client = client2.clone();
            let secret = secret.clone();
            let cluster = cluster.clone();
            Box::pin(async move {
                let n = client
                    .get_node(&node)
                    .await
                    .map_err(|e| ReplicaError::Down(e.to_string()))?;
                let c = ReplicaClient::connect_timeout(
                    &n.address, &cluster, "fabctl", &secret, timeout,
                )
                .await
                .map_err(|e| ReplicaError::Down(format!("{}: {e}", n.address)))?;
                Ok(Replica::Remote(Arc::new(c)))
            })
        };
    let report = verify(&vol, reach).await;
    Ok((vol, report))
}
