//! Re-replication: the controller that restores R replicas per chunk set after a node is
//! lost, and the recovery state (`GET /v1/recovery`, `/metrics`).
//!
//! # Rules
//! - A node is *out* after `down_after + out_after` of continuous silence (no heartbeat),
//!   measured from its last heartbeat, or from this manager's start when it has not been
//!   heard since (a restarted manager does not re-home the whole cluster at once).
//! - Flap damping: a node that went silent again less than `out_after` after it came back is
//!   *flapping*; it is out only after `down_after + 2 × out_after` of silence, and it stops
//!   flapping once it stayed up for `out_after`. A node that returns before it is out keeps
//!   its replicas: the gateway resyncs only the chunks whose version moved on. On top of
//!   that at most [`MAX_SYNCING`] replicas are being copied to at once in the whole
//!   cluster, so no burst of failures starts a storm of copies.
//! - Every pass (each second) takes the sets that hold a member on an out (or unregistered)
//!   node, highest risk first (fewest in-service replicas on up nodes), and gives each such
//!   member a new home chosen by the placement rules (weighted rendezvous score over the up
//!   nodes with free space, not a node already in the set, not a failure domain already in
//!   the set). A member still recorded in service is re-homed only when another member of
//!   the set is in service (the last known good copy is never dropped from the record).
//!
//! # Ordering (no acknowledged write lost)
//! 1. The new member is committed durably as *not in service* (syncing: it receives writes,
//!    serves no reads, is not counted for acknowledgements) BEFORE any data goes to it. The
//!    replaced member leaves the record in the same commit.
//! 2. The copy is done by the blockd that holds the volume's lease (the gateway of an
//!    attached volume; a detached volume's new node attaches it itself, see blockd's
//!    agent): it watches the volume record, sees a member it cannot count on and runs its
//!    resync: from a barrier on (every stripe lock taken once) every write is mirrored to the
//!    new member; then every chunk whose (version, digest) differs from an in-service
//!    replica's is copied under that chunk's lock (throttled by blockd's
//!    `--recovery-bandwidth`). A copy racing a write cannot leave old data behind: both hold
//!    the chunk lock, and the version comparison runs after the barrier.
//! 3. Only then, with every stripe locked (no write in flight), does the gateway record the
//!    member in service (`POST /v1/volumes/{name}/replicas`, lease epoch checked).

pub mod rebalance;

use crate::api;
use crate::server::{decode, encode, ApiResult, App};
use crate::store::{Cond, Kind, Op};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most replicas being copied to at once in the cluster.
pub const MAX_SYNCING: usize = 8;

/// What the controller knows of a node between passes (memory only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Track {
    pub up: bool,
    /// When the node entered its current state, ms.
    pub since_ms: u64,
    pub flapping: bool,
}

/// Follows one node's state; returns the new track. Pure (unit-tested).
pub fn track(prev: Option<Track>, up: bool, now_ms: u64, out_after: Duration) -> Track {
    let window = out_after.as_millis() as u64;
    match prev {
        None => Track {
            up,
            since_ms: now_ms,
            flapping: false,
        },
        Some(t) if t.up == up => Track {
            flapping: t.flapping && !(up && now_ms.saturating_sub(t.since_ms) >= window),
            ..t
        },
        Some(t) => Track {
            up,
            since_ms: now_ms,
            // Going down after a short stay up: flapping.
            flapping: t.flapping || (!up && now_ms.saturating_sub(t.since_ms) < window),
        },
    }
}

/// Whether a node silent for `silent_ms` is out (its replicas get re-homed).
pub fn is_out(silent_ms: u64, flapping: bool, down_after: Duration, out_after: Duration) -> bool {
    let o = out_after.as_millis() as u64;
    silent_ms >= down_after.as_millis() as u64 + if flapping { 2 * o } else { o }
}

/// A node as the planner sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub zone: String,
    pub up: bool,
    pub out: bool,
}

/// One re-homing: member `member` of set `set` of volume `volume` moves to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub volume: String,
    pub set: usize,
    pub member: usize,
    pub from: String,
    pub to: String,
    /// In-service replicas on up nodes before the move (the risk: fewer = first).
    pub good: usize,
}

/// Plans this pass's re-homings (pure: unit-tested). `budget` is how many may start.
pub fn plan(
    volumes: &[api::Volume],
    nodes: &HashMap<String, NodeView>,
    candidates: &[crate::placement::Candidate],
    budget: usize,
) -> Vec<Move> {
    let mut want: Vec<(usize, &api::Volume, usize, usize)> = Vec::new();
    for v in volumes {
        for (s, set) in v.sets.iter().enumerate() {
            let good = set
                .members
                .iter()
                .filter(|m| m.in_service && nodes.get(&m.node).is_some_and(|n| n.up))
                .count();
            let in_service = set.members.iter().filter(|m| m.in_service).count();
            for (i, m) in set.members.iter().enumerate() {
                let lost = nodes.get(&m.node).is_none_or(|n| n.out);
                if !lost {
                    continue;
                }
                if m.in_service && in_service < 2 {
                    continue; // the last known good copy stays recorded
                }
                want.push((good, v, s, i));
            }
        }
    }
    want.sort_by(|a, b| (a.0, &a.1.name, a.2).cmp(&(b.0, &b.1.name, b.2)));
    let mut out: Vec<Move> = Vec::new();
    for (good, v, s, i) in want {
        if out.len() >= budget {
            break;
        }
        let set = &v.sets[s];
        // Nodes already in the set (counting earlier moves of this pass).
        let mut exclude: Vec<String> = set.members.iter().map(|m| m.node.clone()).collect();
        let mut zones: Vec<String> = Vec::new();
        for (j, m) in set.members.iter().enumerate() {
            let node = out
                .iter()
                .find(|x| x.volume == v.name && x.set == s && x.member == j)
                .map(|x| x.to.clone())
                .unwrap_or_else(|| m.node.clone());
            if j != i {
                if let Some(n) = nodes.get(&node) {
                    zones.push(n.zone.clone());
                }
            }
            exclude.push(node);
        }
        match crate::placement::replace(v.id, s as u64, candidates, &exclude, &zones) {
            Some(to) => out.push(Move {
                volume: v.name.clone(),
                set: s,
                member: i,
                from: set.members[i].node.clone(),
                to,
                good,
            }),
            None => {
                tracing::debug!(volume = %v.name, set = s, "no node left to re-home a replica to")
            }
        }
    }
    out
}

/// Members on out nodes that can simply leave their set: the set has `replicas` in-service
/// members on up nodes besides them (it was mid-move when the node was lost: a rebalance or
/// drain had added a member). Replacing them would give the set a member too many, and with
/// every node already in the set no replacement exists at all (pure: unit-tested).
pub fn plan_surplus_removals(
    volumes: &[api::Volume],
    nodes: &HashMap<String, NodeView>,
) -> Vec<DrainStep> {
    let mut out = Vec::new();
    for v in volumes {
        for (s, set) in v.sets.iter().enumerate() {
            for (i, m) in set.members.iter().enumerate() {
                if !nodes.get(&m.node).is_none_or(|n| n.out) {
                    continue;
                }
                let others = set
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| {
                        *j != i && o.in_service && nodes.get(&o.node).is_some_and(|n| n.up)
                    })
                    .count();
                if others >= v.replicas.max(1) as usize {
                    out.push(DrainStep::Remove {
                        volume: v.name.clone(),
                        set: s,
                        node: m.node.clone(),
                    });
                }
            }
        }
    }
    out
}

/// One drain step (see [`plan_drain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainStep {
    /// Set `set` of `volume` gets a new member on `to`, recorded out of service (the lease
    /// holder copies it).
    Add {
        volume: String,
        set: usize,
        to: String,
    },
    /// The draining `node` leaves set `set` of `volume`: `replicas` other members are in
    /// service.
    Remove {
        volume: String,
        set: usize,
        node: String,
    },
}

/// Plans this pass's drain steps (pure: unit-tested). A set listing a draining node gets one
/// new member (by the placement rules, never a draining node) while it has fewer than
/// `replicas` members on other nodes; the draining member stays in service meanwhile and
/// leaves only once `replicas` members on other nodes are in service. `budget` bounds the
/// additions (copies) started; removals are not bounded.
pub fn plan_drain(
    volumes: &[api::Volume],
    draining: &BTreeSet<String>,
    nodes: &HashMap<String, NodeView>,
    candidates: &[crate::placement::Candidate],
    budget: usize,
) -> Vec<DrainStep> {
    let mut out = Vec::new();
    let mut added = 0;
    for v in volumes {
        let r = v.replicas.max(1) as usize;
        for (s, set) in v.sets.iter().enumerate() {
            let Some(d) = set.members.iter().find(|m| draining.contains(&m.node)) else {
                continue;
            };
            let others: Vec<&api::Member> = set
                .members
                .iter()
                .filter(|m| !draining.contains(&m.node))
                .collect();
            if others.iter().filter(|m| m.in_service).count() >= r {
                out.push(DrainStep::Remove {
                    volume: v.name.clone(),
                    set: s,
                    node: d.node.clone(),
                });
            } else if others.len() < r && added < budget {
                let exclude: Vec<String> = set.members.iter().map(|m| m.node.clone()).collect();
                let zones: Vec<String> = others
                    .iter()
                    .filter_map(|m| nodes.get(&m.node).map(|n| n.zone.clone()))
                    .collect();
                let cands: Vec<crate::placement::Candidate> = candidates
                    .iter()
                    .filter(|c| !draining.contains(&c.name))
                    .cloned()
                    .collect();
                if let Some(to) =
                    crate::placement::replace(v.id, s as u64, &cands, &exclude, &zones)
                {
                    added += 1;
                    out.push(DrainStep::Add {
                        volume: v.name.clone(),
                        set: s,
                        to,
                    });
                }
            }
        }
    }
    out
}

/// Bytes copied, summed from the nodes' counters, with the rate over the last 10 s. Pure
/// (unit-tested).
#[derive(Default, Debug, Clone)]
pub struct Counter {
    /// Last counter reported by each node.
    reported: HashMap<String, u64>,
    pub total: u64,
    /// (ms, total) samples of the last 10 s.
    samples: VecDeque<(u64, u64)>,
}

impl Counter {
    /// A node reports its counter `value` at `now` (a smaller one than last time: the
    /// daemon restarted and counts from 0 again).
    pub fn report(&mut self, node: &str, value: u64, now: u64) {
        let prev = self.reported.insert(node.to_string(), value).unwrap_or(0);
        let delta = if value >= prev { value - prev } else { value };
        if self.samples.is_empty() {
            self.samples.push_back((now, self.total));
        }
        self.total += delta;
        self.samples.push_back((now, self.total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > RATE_WINDOW_MS)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the samples of the last 10 s.
    pub fn rate(&self, now: u64) -> f64 {
        match self
            .samples
            .iter()
            .find(|(t, _)| now.saturating_sub(*t) <= RATE_WINDOW_MS)
        {
            Some((t, c)) if now > *t => {
                self.total.saturating_sub(*c) as f64 * 1000.0 / (now - t) as f64
            }
            _ => 0.0,
        }
    }
}

/// Memory-only recovery state in the manager.
#[derive(Default)]
pub struct RecoveryLive {
    tracks: Mutex<HashMap<String, Track>>,
    copied: Mutex<Counter>,
    /// Per volume (by name).
    volumes: Mutex<HashMap<String, Counter>>,
    replaced: AtomicU64,
    /// Nodes out at the last pass.
    out: Mutex<Vec<String>>,
    /// The rebalancer's state at the last pass (`moved` is kept in `moved`).
    rebalance: Mutex<api::Rebalance>,
    /// Rebalance moves completed (old member removed).
    moved: AtomicU64,
}

const RATE_WINDOW_MS: u64 = 10_000;

/// The controller task: one pass per second until shutdown.
pub async fn controller(app: Arc<App>) {
    let mut stop = app.stopping.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // A controller: only the leader re-homes replicas.
        if !app.leads() {
            continue;
        }
        if let Err(e) = pass(&app).await {
            tracing::warn!(error = %e, "re-replication pass failed; retrying");
        }
    }
}

/// `c` plus the leader's fence: the write applies only while this manager still leads (with
/// several managers a deposed leader's late write fails instead of racing the new leader's).
fn leader_fenced(app: &App, c: Cond) -> Result<Vec<Cond>, String> {
    let mut conds = app
        .leadership
        .fence()
        .ok_or_else(|| "no longer the leader".to_string())?;
    conds.push(c);
    Ok(conds)
}

fn err(e: crate::server::Error) -> String {
    let r = axum::response::IntoResponse::into_response(e);
    format!("status {}", r.status())
}

/// One controller pass; returns how many replicas were re-homed.
pub async fn pass(app: &App) -> Result<usize, String> {
    let _g = app.mutate.lock().await;
    let now = crate::server::now_ms();
    let (_, node_items) = app.store.list(Kind::Node).map_err(|e| e.to_string())?;
    let mut views = HashMap::new();
    let mut out_now = Vec::new();
    {
        let live = app.live.lock().unwrap();
        let mut tracks = app.recovery.tracks.lock().unwrap();
        for (name, b) in &node_items {
            let n: api::Node = decode(b).map_err(err)?;
            let hb = live
                .get(name)
                .map(|l| l.last_heartbeat_ms)
                .unwrap_or(0)
                .max(app.started_ms);
            let up = crate::server::node_state(
                live.get(name).map(|l| l.last_heartbeat_ms),
                now,
                app.cfg.down_after,
            ) == api::NodeState::Up;
            let t = track(tracks.get(name).copied(), up, now, app.cfg.out_after);
            if let Some(p) = tracks.get(name) {
                if !p.flapping && t.flapping {
                    tracing::warn!(node = %name, "node is flapping: its replicas move only after twice out_after of silence");
                }
            }
            tracks.insert(name.clone(), t);
            let out = !up
                && is_out(
                    now.saturating_sub(hb),
                    t.flapping,
                    app.cfg.down_after,
                    app.cfg.out_after,
                );
            if out {
                out_now.push(name.clone());
            }
            views.insert(
                name.clone(),
                NodeView {
                    zone: n.zone,
                    up,
                    out,
                },
            );
        }
    }
    *app.recovery.out.lock().unwrap() = out_now;
    let tracks = {
        let mut t = app.recovery.tracks.lock().unwrap();
        // A removed node that registers again is a new node (no flap history).
        t.retain(|n, _| node_items.iter().any(|(k, _)| k == n));
        t.clone()
    };
    let (_, vol_items) = app.store.list(Kind::Volume).map_err(|e| e.to_string())?;
    let mut vols = Vec::new();
    let mut raw = HashMap::new();
    for (name, b) in vol_items {
        vols.push(decode::<api::Volume>(&b).map_err(err)?);
        raw.insert(name, b);
    }
    let syncing = vols
        .iter()
        .flat_map(|v| v.sets.iter().flat_map(|s| s.members.iter()))
        .filter(|m| !m.in_service && views.get(&m.node).is_some_and(|n| n.up))
        .count();
    let budget = MAX_SYNCING.saturating_sub(syncing);
    // Lost members of sets that have R good copies without them just leave (no copy).
    let surplus = plan_surplus_removals(&vols, &views);
    if !surplus.is_empty() {
        rebalance_blocked(app, "replicas are being re-homed (recovery first)");
        return apply_steps(app, &vols, &raw, &surplus, "lost surplus member");
    }
    let (_, ds) = crate::server::disks(app).map_err(err)?;
    let candidates = crate::server::placement_candidates(app, &ds).map_err(err)?;
    let moves = if budget == 0 {
        Vec::new()
    } else {
        plan(&vols, &views, &candidates, budget)
    };
    if moves.is_empty() {
        // Drains go on when nothing is lost (a lost replica comes first).
        let mut draining = BTreeSet::new();
        for name in views.keys() {
            if crate::server::is_draining(app, name).map_err(err)? {
                draining.insert(name.clone());
            }
        }
        if !draining.is_empty() {
            rebalance_blocked(app, "a drain is under way");
            let steps = plan_drain(&vols, &draining, &views, &candidates, budget);
            return apply_steps(app, &vols, &raw, &steps, "drain");
        }
        // Then rebalancing (nothing lost, nothing draining).
        let ctx = RebalanceCtx {
            views: &views,
            tracks: &tracks,
            disks: &ds,
            candidates: &candidates,
            budget,
            now,
        };
        return rebalance_pass(app, &vols, &raw, &ctx);
    }
    rebalance_blocked(app, "replicas are being re-homed (recovery first)");
    let mut done = 0;
    let mut by_vol: BTreeMap<&str, Vec<&Move>> = BTreeMap::new();
    for m in &moves {
        by_vol.entry(&m.volume).or_default().push(m);
    }
    for (name, ms) in by_vol {
        let Some(mut v) = vols.iter().find(|v| v.name == name).cloned() else {
            continue;
        };
        for m in &ms {
            v.sets[m.set].members[m.member] = api::Member {
                node: m.to.clone(),
                in_service: false,
            };
        }
        // Durable before any data goes to the new members (see the module docs).
        let rev = app
            .store
            .commit(
                &leader_fenced(
                    app,
                    Cond::Equals(Kind::Volume, name.to_string(), raw.get(name).cloned()),
                )?,
                &[Op::Put(Kind::Volume, name.to_string(), encode(&v))],
            )
            .map_err(|e| e.to_string())?;
        app.volume_rev.send_replace(rev);
        for m in ms {
            tracing::info!(volume = %m.volume, set = m.set, from = %m.from, to = %m.to, good_copies = m.good, "replica re-homed: recorded syncing, the lease holder copies it");
            done += 1;
        }
    }
    app.recovery
        .replaced
        .fetch_add(done as u64, Ordering::Relaxed);
    Ok(done)
}

/// What a rebalancer pass needs from the controller pass.
struct RebalanceCtx<'a> {
    views: &'a HashMap<String, NodeView>,
    tracks: &'a HashMap<String, Track>,
    disks: &'a [api::Disk],
    /// Up, non-draining nodes with free space (weighted by it).
    candidates: &'a [crate::placement::Candidate],
    /// Copies that may start cluster-wide.
    budget: usize,
    now: u64,
}

/// Notes that rebalancing waits for something else (sets misplaced or not).
fn rebalance_blocked(app: &App, why: &str) {
    let mut r = app.recovery.rebalance.lock().unwrap();
    r.enabled = app.cfg.rebalance;
    if !app.cfg.rebalance {
        r.state = "disabled".into();
        r.reason.clear();
    } else if r.pending > 0 || r.in_progress > 0 {
        r.state = "waiting".into();
        r.reason = why.into();
    }
}

/// Plans and records this pass's rebalance steps (see [`rebalance`]); returns how many.
fn rebalance_pass(
    app: &App,
    vols: &[api::Volume],
    raw: &HashMap<String, Vec<u8>>,
    ctx: &RebalanceCtx,
) -> Result<usize, String> {
    if !app.cfg.rebalance {
        rebalance_blocked(app, "");
        return Ok(0);
    }
    // The ideal placement: up nodes weighted by capacity (stable as data is written).
    let mut ideal: Vec<crate::placement::Candidate> = ctx
        .views
        .iter()
        .filter(|(_, v)| v.up)
        .filter_map(|(name, v)| {
            let cap: u64 = ctx
                .disks
                .iter()
                .filter(|d| &d.node == name)
                .map(|d| d.capacity)
                .sum();
            (cap > 0).then(|| crate::placement::Candidate {
                name: name.clone(),
                zone: v.zone.clone(),
                weight: cap as f64,
            })
        })
        .collect();
    ideal.sort_by(|a, b| a.name.cmp(&b.name));
    let settle = app.cfg.rebalance_after.as_millis() as u64;
    let eligible: BTreeSet<String> = ctx
        .candidates
        .iter()
        .filter(|c| {
            ctx.tracks.get(&c.name).is_some_and(|t| {
                t.up && !t.flapping && ctx.now.saturating_sub(t.since_ms) >= settle
            })
        })
        .map(|c| c.name.clone())
        .collect();
    let degraded = vols
        .iter()
        .flat_map(|v| v.sets.iter().map(move |s| (v, s)))
        .filter(|(v, s)| {
            s.members
                .iter()
                .filter(|m| m.in_service && ctx.views.get(&m.node).is_some_and(|n| n.up))
                .count()
                < v.replicas as usize
        })
        .count();
    let under_way = rebalance::moves_under_way(vols);
    let budget = ctx
        .budget
        .min(rebalance::MAX_REBALANCING.saturating_sub(under_way));
    let plan = rebalance::plan_rebalance(vols, ctx.views, &ideal, &eligible, degraded == 0, budget);
    let adds = plan
        .steps
        .iter()
        .filter(|s| matches!(s, DrainStep::Add { .. }))
        .count();
    let removes = plan.steps.len() - adds;
    {
        let mut r = app.recovery.rebalance.lock().unwrap();
        r.enabled = true;
        r.pending = plan.pending;
        r.in_progress = plan.in_progress + adds as u64;
        r.reason = if plan.pending == 0 {
            String::new()
        } else if degraded > 0 {
            format!("{degraded} chunk sets degraded (recovery first)")
        } else if !plan.waiting_for.is_empty() {
            format!(
                "waiting for {} to be up for {:?} with free space",
                plan.waiting_for
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                app.cfg.rebalance_after
            )
        } else {
            format!(
                "at most {} moves at once",
                rebalance::MAX_REBALANCING.min(MAX_SYNCING)
            )
        };
        r.state = if r.in_progress > 0 {
            "moving"
        } else if r.pending > 0 {
            "waiting"
        } else {
            "idle"
        }
        .into();
    }
    let done = apply_steps(app, vols, raw, &plan.steps, "rebalance")?;
    app.recovery
        .moved
        .fetch_add(removes as u64, Ordering::Relaxed);
    Ok(done)
}

/// Records drain or rebalance steps, one commit per volume (conditional on the record read).
fn apply_steps(
    app: &App,
    vols: &[api::Volume],
    raw: &HashMap<String, Vec<u8>>,
    steps: &[DrainStep],
    what: &str,
) -> Result<usize, String> {
    let mut by_vol: BTreeMap<&str, Vec<&DrainStep>> = BTreeMap::new();
    for st in steps {
        let v = match st {
            DrainStep::Add { volume, .. } | DrainStep::Remove { volume, .. } => volume,
        };
        by_vol.entry(v.as_str()).or_default().push(st);
    }
    let mut done = 0;
    for (name, sts) in by_vol {
        let Some(mut v) = vols.iter().find(|v| v.name == name).cloned() else {
            continue;
        };
        for st in &sts {
            match st {
                DrainStep::Add { set, to, .. } => v.sets[*set].members.push(api::Member {
                    node: to.clone(),
                    in_service: false,
                }),
                DrainStep::Remove { set, node, .. } => {
                    v.sets[*set].members.retain(|m| &m.node != node)
                }
            }
        }
        let rev = app
            .store
            .commit(
                &leader_fenced(
                    app,
                    Cond::Equals(Kind::Volume, name.to_string(), raw.get(name).cloned()),
                )?,
                &[Op::Put(Kind::Volume, name.to_string(), encode(&v))],
            )
            .map_err(|e| e.to_string())?;
        app.volume_rev.send_replace(rev);
        for st in sts {
            tracing::info!(step = ?st, what, "placement step recorded");
            done += 1;
        }
    }
    Ok(done)
}

/// Bytes of a volume's set `s` (its chunks `s, s + n, s + 2n, …`).
fn set_bytes(v: &api::Volume, s: usize) -> u64 {
    let n = v.sets.len().max(1) as u64;
    let cs = v.chunk_size.max(1);
    let chunks = v.size.div_ceil(cs);
    let mine = chunks / n + u64::from((s as u64) < chunks % n);
    (mine * cs).min(v.size)
}

/// The recovery document (also behind the metrics).
pub fn document(app: &App) -> ApiResult<api::Recovery> {
    let (_, node_items) = app.store.list(Kind::Node)?;
    let mut up_nodes = Vec::new();
    let (mut up, mut down) = (0, 0);
    for (_, b) in &node_items {
        let n = crate::server::with_liveness(app, decode::<api::Node>(b)?);
        if n.state == api::NodeState::Up {
            up += 1;
            up_nodes.push(n.name);
        } else {
            down += 1;
        }
    }
    let (_, vol_items) = app.store.list(Kind::Volume)?;
    let mut volumes = Vec::new();
    let (mut degraded, mut syncing, mut left) = (0u64, 0u64, 0u64);
    for (_, b) in &vol_items {
        let v: api::Volume = decode(b)?;
        let mut vr = api::VolumeRecovery {
            name: v.name.clone(),
            sets: v.sets.len() as u64,
            degraded_sets: 0,
            in_progress: 0,
            bytes_left: 0,
            bytes_copied: 0,
            rate: 0.0,
        };
        if let Some(c) = app.recovery.volumes.lock().unwrap().get(&v.name) {
            vr.bytes_copied = c.total;
            vr.rate = c.rate(crate::server::now_ms());
        }
        for (s, set) in v.sets.iter().enumerate() {
            // Degraded: fewer good copies than wanted (a member recorded in service on a
            // down node is not a good copy right now).
            let ins = set
                .members
                .iter()
                .filter(|m| m.in_service && up_nodes.contains(&m.node))
                .count();
            if ins < v.replicas as usize {
                vr.degraded_sets += 1;
            }
            let sy = set
                .members
                .iter()
                .filter(|m| !m.in_service && up_nodes.contains(&m.node))
                .count() as u64;
            if sy > 0 {
                vr.in_progress += 1;
                syncing += sy;
                vr.bytes_left += sy * set_bytes(&v, s);
            }
        }
        degraded += vr.degraded_sets;
        left += vr.bytes_left;
        volumes.push(vr);
    }
    let (rate, copied) = {
        let c = app.recovery.copied.lock().unwrap();
        (c.rate(crate::server::now_ms()), c.total)
    };
    let out_nodes = app.recovery.out.lock().unwrap().clone();
    let nodes = node_health(app, &node_items, &vol_items, &out_nodes)?;
    let mut rebalance = app.recovery.rebalance.lock().unwrap().clone();
    rebalance.enabled = app.cfg.rebalance;
    rebalance.moved = app.recovery.moved.load(Ordering::Relaxed);
    if !app.cfg.rebalance {
        rebalance.state = "disabled".into();
    } else if rebalance.state.is_empty() {
        rebalance.state = "idle".into();
    }
    Ok(api::Recovery {
        nodes_up: up,
        nodes_down: down,
        nodes_out: out_nodes,
        degraded_sets: degraded,
        syncing_replicas: syncing,
        bytes_left: left,
        bytes_copied: copied,
        rate,
        eta_s: (rate > 0.0 && left > 0).then(|| left as f64 / rate),
        replaced: app.recovery.replaced.load(Ordering::Relaxed),
        volumes,
        rebalance,
        nodes,
        full_ratio: app.cfg.full_ratio,
    })
}

/// Every registered node's share of the data and its condition (by name).
fn node_health(
    app: &App,
    node_items: &[(String, Vec<u8>)],
    vol_items: &[(String, Vec<u8>)],
    out: &[String],
) -> ApiResult<Vec<api::NodeHealth>> {
    let (_, ds) = crate::server::disks(app)?;
    let mut by_name: BTreeMap<String, api::NodeHealth> = BTreeMap::new();
    for (name, _) in node_items {
        let mine: Vec<&api::Disk> = ds.iter().filter(|d| &d.node == name).collect();
        by_name.insert(
            name.clone(),
            api::NodeHealth {
                name: name.clone(),
                out: out.contains(name),
                draining: crate::server::is_draining(app, name)?,
                full: mine.iter().all(|d| {
                    crate::server::placeable_free(d.capacity, d.used, app.cfg.full_ratio) == 0
                }),
                sets: 0,
                syncing: 0,
                chunks: 0,
                used: mine.iter().map(|d| d.used).sum(),
                capacity: mine.iter().map(|d| d.capacity).sum(),
            },
        );
    }
    for (_, b) in vol_items {
        let v: api::Volume = decode(b)?;
        let cs = v.chunk_size.max(1);
        for (s, set) in v.sets.iter().enumerate() {
            let chunks = set_bytes(&v, s).div_ceil(cs);
            for m in &set.members {
                if let Some(h) = by_name.get_mut(&m.node) {
                    h.sets += 1;
                    h.chunks += chunks;
                    h.syncing += u64::from(!m.in_service);
                }
            }
        }
    }
    Ok(by_name.into_values().collect())
}

pub async fn get_recovery(State(app): State<Arc<App>>) -> ApiResult<Json<api::Recovery>> {
    Ok(Json(document(&app)?))
}

/// `PUT /v1/recovery/progress/{node}`: a blockd's copy counter.
pub async fn report_progress(
    State(app): State<Arc<App>>,
    crate::server::Name(name): crate::server::Name,
    crate::server::Body(p): crate::server::Body<api::RecoveryProgress>,
) -> ApiResult<StatusCode> {
    crate::server::validate_node_name(&name)?;
    if app.store.get(Kind::Node, &name)?.is_none() {
        return Err(crate::server::not_found(format!(
            "node {name} is not registered"
        )));
    }
    let now = crate::server::now_ms();
    app.recovery
        .copied
        .lock()
        .unwrap()
        .report(&name, p.copied_bytes, now);
    let mut vols = app.recovery.volumes.lock().unwrap();
    for (v, n) in &p.volumes {
        if vols.len() >= 100_000 && !vols.contains_key(v) {
            break; // bounded: a confused client cannot grow it without end
        }
        vols.entry(v.clone()).or_default().report(&name, *n, now);
    }
    Ok(StatusCode::NO_CONTENT)
}

pub fn render_metrics(app: &App, out: &mut String) {
    use std::fmt::Write;
    let Ok(d) = document(app) else { return };
    for (name, help, kind, v) in [
        (
            "recovery_degraded_sets",
            "Chunk sets with fewer in-service replicas on up nodes than wanted",
            "gauge",
            d.degraded_sets as f64,
        ),
        (
            "recovery_syncing_replicas",
            "Replicas being copied to",
            "gauge",
            d.syncing_replicas as f64,
        ),
        (
            "recovery_bytes_left",
            "Upper bound of the bytes still to copy",
            "gauge",
            d.bytes_left as f64,
        ),
        (
            "recovery_bytes_copied_total",
            "Bytes the blockds reported copied (re-replication and resync)",
            "counter",
            d.bytes_copied as f64,
        ),
        (
            "recovery_rate_bytes",
            "Copy rate over the last 10 s, bytes per second",
            "gauge",
            d.rate,
        ),
        (
            "recovery_replicas_replaced_total",
            "Replicas re-homed to a new node",
            "counter",
            d.replaced as f64,
        ),
        (
            "recovery_nodes_out",
            "Nodes silent past out_after",
            "gauge",
            d.nodes_out.len() as f64,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP volume_mgr_{name} {help}.\n# TYPE volume_mgr_{name} {kind}\nvolume_mgr_{name} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Candidate;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn counters_sum_nodes_and_survive_restarts() {
        let mut c = Counter::default();
        c.report("a", 10, 1_000);
        c.report("b", 5, 1_000);
        c.report("a", 30, 2_000);
        assert_eq!(c.total, 35);
        // b restarted: its new counter counts from 0.
        c.report("b", 2, 3_000);
        assert_eq!(c.total, 37);
        // 37 bytes since the first sample (total 0 at 1 s), over 2 s.
        assert!((c.rate(3_000) - 18.5).abs() < 1e-9, "{}", c.rate(3_000));
        // Samples older than 10 s no longer count.
        assert_eq!(c.rate(20_000), 0.0);
    }

    #[test]
    fn out_after_and_flap_damping() {
        let o = 10 * S;
        let d = 2 * S;
        assert!(!is_out(11_999, false, d, o));
        assert!(is_out(12_000, false, d, o));
        assert!(!is_out(12_000, true, d, o));
        assert!(is_out(22_000, true, d, o));
        // Up for a long time, then down: not flapping.
        let t = track(None, true, 0, o);
        let t = track(Some(t), false, 60_000, o);
        assert!(!t.flapping);
        // Back at 61 s, down again at 65 s (up 4 s < 10 s): flapping.
        let t = track(Some(t), true, 61_000, o);
        let t = track(Some(t), false, 65_000, o);
        assert!(t.flapping && !t.up);
        // Stays flapping while down; back up, stays flapping until up for out_after.
        let t = track(Some(t), false, 100_000, o);
        assert!(t.flapping);
        let t = track(Some(t), true, 101_000, o);
        let t = track(Some(t), true, 105_000, o);
        assert!(t.flapping);
        let t = track(Some(t), true, 111_000, o);
        assert!(!t.flapping);
    }

    fn vol(name: &str, sets: Vec<Vec<(&str, bool)>>) -> api::Volume {
        api::Volume {
            name: name.into(),
            id: 7,
            size: 64 << 20,
            chunk_size: api::DEFAULT_CHUNK_SIZE,
            replicas: 3,
            min_replicas: 2,
            sets: sets
                .into_iter()
                .map(|ms| api::ChunkSet {
                    members: ms
                        .into_iter()
                        .map(|(n, i)| api::Member {
                            node: n.into(),
                            in_service: i,
                        })
                        .collect(),
                })
                .collect(),
            created_ms: 0,
        }
    }

    fn views(up: &[&str], out: &[&str]) -> HashMap<String, NodeView> {
        up.iter()
            .map(|n| (n, true, false))
            .chain(out.iter().map(|n| (n, false, true)))
            .map(|(n, u, o)| {
                (
                    n.to_string(),
                    NodeView {
                        zone: n.to_string(),
                        up: u,
                        out: o,
                    },
                )
            })
            .collect()
    }

    fn cands(names: &[&str]) -> Vec<Candidate> {
        names
            .iter()
            .map(|n| Candidate {
                name: n.to_string(),
                zone: n.to_string(),
                weight: 1.0,
            })
            .collect()
    }

    #[test]
    fn a_lost_member_of_a_set_with_r_good_copies_just_leaves() {
        // Mid-move sets (R + 1 members) when c is lost: set 0 has 3 good copies without c,
        // set 1 only 2 (its new member d is still syncing), set 2 is a plain 3-member set.
        let v = vol(
            "v",
            vec![
                vec![("a", true), ("b", true), ("c", true), ("d", true)],
                vec![("a", true), ("b", true), ("c", true), ("d", false)],
                vec![("a", true), ("b", true), ("c", true)],
            ],
        );
        let nodes = views(&["a", "b", "d"], &["c"]);
        let r = plan_surplus_removals(std::slice::from_ref(&v), &nodes);
        assert_eq!(
            r,
            vec![DrainStep::Remove {
                volume: "v".into(),
                set: 0,
                node: "c".into()
            }]
        );
        // Nothing out: nothing to remove.
        assert!(plan_surplus_removals(&[v], &views(&["a", "b", "c", "d"], &[])).is_empty());
    }

    #[test]
    fn plans_highest_risk_first_and_keeps_the_last_copy() {
        let v = vol(
            "v",
            vec![
                vec![("a", true), ("b", true), ("c", false)], // one lost, 2 good
                vec![("a", true), ("c", false), ("d", false)], // c lost, d down not out
                vec![("c", true), ("b", false), ("d", false)], // c is the last good copy
            ],
        );
        let mut nodes = views(&["a", "b", "e"], &["c"]);
        nodes.insert(
            "d".into(),
            NodeView {
                zone: "d".into(),
                up: false,
                out: false,
            },
        );
        let c = cands(&["a", "b", "e"]);
        let p = plan(std::slice::from_ref(&v), &nodes, &c, 8);
        assert_eq!(p.len(), 2, "{p:?}");
        // Set 1 has one good copy: first.
        assert_eq!((p[0].set, p[0].member, p[0].good), (1, 1, 1));
        assert_eq!(p[0].to, "b"); // a and d are in the set; b or e, never a
        assert_eq!((p[1].set, p[1].member, p[1].good), (0, 2, 2));
        assert_eq!(p[1].to, "e");
        // The budget limits a pass, the riskiest first.
        let p1 = plan(std::slice::from_ref(&v), &nodes, &c, 1);
        assert_eq!(p1, p[..1].to_vec());
        // An in-service member on an out node is re-homed when another copy is in service.
        let v2 = vol("w", vec![vec![("a", true), ("b", true), ("c", true)]]);
        let p = plan(&[v2], &nodes, &c, 8);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].from.as_str(), p[0].to.as_str()), ("c", "e"));
        // An unregistered node counts as lost; no node left: nothing planned.
        let v3 = vol("x", vec![vec![("a", true), ("b", true), ("gone", false)]]);
        let p = plan(&[v3], &nodes, &cands(&["a", "b"]), 8);
        assert!(p.is_empty());
    }

    #[test]
    fn two_losses_in_one_set_get_distinct_nodes() {
        let v = vol("v", vec![vec![("a", true), ("c", false), ("d", false)]]);
        let nodes = views(&["a", "b", "e"], &["c", "d"]);
        let p = plan(&[v], &nodes, &cands(&["a", "b", "e"]), 8);
        assert_eq!(p.len(), 2);
        assert_ne!(p[0].to, p[1].to);
        assert!(p.iter().all(|m| m.to != "a"));
    }

    #[test]
    fn drain_adds_then_removes_keeping_the_old_copy_until_the_new_one_serves() {
        let draining: BTreeSet<String> = ["d".to_string()].into();
        let nodes = views(&["a", "b", "d", "e"], &[]);
        let all = cands(&["a", "b", "d", "e"]);
        // Step 1: a new member, never on the draining node; the old copy stays.
        let v = vol(
            "v",
            vec![
                vec![("a", true), ("b", true), ("d", true)],
                vec![("a", true), ("b", true), ("e", true)],
            ],
        );
        let p = plan_drain(std::slice::from_ref(&v), &draining, &nodes, &all, 8);
        assert_eq!(
            p,
            vec![DrainStep::Add {
                volume: "v".into(),
                set: 0,
                to: "e".into()
            }]
        );
        // While the new member syncs: nothing more (no second copy, no removal).
        let syncing = vol(
            "v",
            vec![vec![("a", true), ("b", true), ("d", true), ("e", false)]],
        );
        assert!(plan_drain(&[syncing], &draining, &nodes, &all, 8).is_empty());
        // Once it serves, the draining member leaves.
        let done = vol(
            "v",
            vec![vec![("a", true), ("b", true), ("d", true), ("e", true)]],
        );
        assert_eq!(
            plan_drain(&[done], &draining, &nodes, &all, 8),
            vec![DrainStep::Remove {
                volume: "v".into(),
                set: 0,
                node: "d".into()
            }]
        );
        // No budget: no copy starts.
        assert!(plan_drain(&[v], &draining, &nodes, &all, 0).is_empty());
    }

    #[test]
    fn full_disks_offer_nothing() {
        use crate::server::placeable_free;
        assert_eq!(placeable_free(100, 10, 0.95), 90);
        assert_eq!(placeable_free(100, 95, 0.95), 0);
        assert_eq!(placeable_free(100, 99, 0.95), 0);
        assert_eq!(placeable_free(0, 0, 0.95), 0);
        assert_eq!(placeable_free(100, 50, 0.5), 0);
    }

    /// Placement skips nodes whose disks are past `full_ratio` (as heartbeats report them):
    /// with two of four nodes full a 3-replica volume cannot be placed (507), and a node
    /// that reports space again takes its share.
    #[test]
    fn full_nodes_are_skipped_by_placement() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                use crate::client::Client;
                let dir = tempfile::tempdir().unwrap();
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", l.local_addr().unwrap());
                let cfg = crate::Config {
                    listen: l.local_addr().unwrap().to_string(),
                    data_dir: dir.path().to_path_buf(),
                    full_ratio: 0.9,
                    ..Default::default()
                };
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let srv = tokio::spawn(crate::serve(cfg, l, async move {
                    let _ = rx.await;
                }));
                let c = Client::new(vec![url]);
                let disk = |used: u64| {
                    vec![api::DiskSpec {
                        path: "/d".into(),
                        capacity: 1 << 30,
                        used,
                    }]
                };
                for (i, used) in [(1, 0), (2, 0), (3, 1000 << 20), (4, 1000 << 20)] {
                    c.register_node(
                        &format!("n{i}"),
                        &api::RegisterNode {
                            address: format!("127.0.0.1:{}", 7800 + i),
                            nbd_address: String::new(),
                            nbd_socket: None,
                            zone: None,
                            disks: disk(used),
                        },
                    )
                    .await
                    .unwrap();
                }
                let create = |name: &str| api::CreateVolume {
                    name: name.into(),
                    size: 64 << 20,
                    replicas: Some(3),
                    min_replicas: None,
                };
                let e = c.create_volume(&create("a")).await.unwrap_err();
                assert!(
                    e.to_string().contains("n3") || e.to_string().contains("capacity"),
                    "{e}"
                );
                c.heartbeat("n3", &api::Heartbeat { disks: disk(0) })
                    .await
                    .unwrap();
                let v = c.create_volume(&create("b")).await.unwrap();
                assert!(v
                    .sets
                    .iter()
                    .all(|s| s.members.iter().all(|m| m.node != "n4")));
                let _ = tx.send(());
                let _ = srv.await;
            });
    }

    #[test]
    fn set_bytes_cover_the_volume() {
        let mut v = vol("v", vec![vec![]; 3]);
        v.size = 10 * api::DEFAULT_CHUNK_SIZE;
        let total: u64 = (0..3).map(|s| set_bytes(&v, s)).sum();
        assert_eq!(total, v.size);
        assert_eq!(set_bytes(&v, 0), 4 * api::DEFAULT_CHUNK_SIZE);
    }

    /// The controller in a real manager over HTTP: a node that stops heartbeating is re-homed
    /// after down_after + out_after, at most MAX_SYNCING at a time, new members recorded out
    /// of service; the recovery document, the metrics and the progress reports follow.
    #[test]
    fn rehoming_through_the_api() {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(rehoming_through_the_api_async());
    }

    async fn rehoming_through_the_api_async() {
        use crate::client::Client;
        let dir = tempfile::tempdir().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let url = format!("http://{addr}");
        let cfg = crate::Config {
            listen: l.local_addr().unwrap().to_string(),
            data_dir: dir.path().to_path_buf(),
            down_after: Duration::from_millis(400),
            out_after: Duration::from_millis(800),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let srv = tokio::spawn(crate::serve(cfg, l, async move {
            let _ = rx.await;
        }));
        let c = Client::new(vec![url]);
        let disks = vec![api::DiskSpec {
            path: "/d".into(),
            capacity: 1 << 30,
            used: 0,
        }];
        for i in 1..=4 {
            c.register_node(
                &format!("n{i}"),
                &api::RegisterNode {
                    address: format!("127.0.0.1:{}", 7800 + i),
                    nbd_address: String::new(),
                    nbd_socket: None,
                    zone: None,
                    disks: disks.clone(),
                },
            )
            .await
            .unwrap();
        }
        let v = c
            .create_volume(&api::CreateVolume {
                name: "vol".into(),
                size: 64 << 20,
                replicas: Some(3),
                min_replicas: None,
            })
            .await
            .unwrap();
        let on_n3: Vec<usize> = (0..v.sets.len())
            .filter(|s| v.sets[*s].members.iter().any(|m| m.node == "n3"))
            .collect();
        assert!(on_n3.len() > MAX_SYNCING, "{}", on_n3.len());
        // n1, n2, n4 beat; n3 is silent from now on.
        let hb = c.clone();
        let beats = tokio::spawn(async move {
            loop {
                for n in ["n1", "n2", "n4"] {
                    let _ = hb
                        .heartbeat(
                            n,
                            &api::Heartbeat {
                                disks: vec![api::DiskSpec {
                                    path: "/d".into(),
                                    capacity: 1 << 30,
                                    used: 0,
                                }],
                            },
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let t = std::time::Instant::now();
        // Nothing moves before down_after + out_after (1.2 s).
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(c.get_volume("vol").await.unwrap(), v);
        let syncing = |v: &api::Volume| -> Vec<(usize, String)> {
            v.sets
                .iter()
                .enumerate()
                .flat_map(|(s, set)| {
                    set.members
                        .iter()
                        .filter(|m| !m.in_service)
                        .map(move |m| (s, m.node.clone()))
                })
                .collect()
        };
        let first = loop {
            let cur = c.get_volume("vol").await.unwrap();
            if !syncing(&cur).is_empty() {
                break cur;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "nothing re-homed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            t.elapsed() >= Duration::from_millis(1100),
            "{:?}",
            t.elapsed()
        );
        // One pass: MAX_SYNCING new members, recorded out of service, on nodes new to the set.
        let sy = syncing(&first);
        assert_eq!(sy.len(), MAX_SYNCING, "{sy:?}");
        for (s, n) in &sy {
            assert!(on_n3.contains(s));
            let nodes: Vec<&str> = first.sets[*s]
                .members
                .iter()
                .map(|m| m.node.as_str())
                .collect();
            assert!(!nodes.contains(&"n3") && nodes.len() == 3, "{nodes:?}");
            assert_eq!(nodes.iter().filter(|x| **x == n).count(), 1);
        }
        let d = c.recovery().await.unwrap();
        assert_eq!(d.nodes_out, vec!["n3".to_string()]);
        assert_eq!(d.syncing_replicas, MAX_SYNCING as u64);
        assert_eq!(d.degraded_sets, on_n3.len() as u64);
        assert_eq!(d.bytes_left, MAX_SYNCING as u64 * (4 << 20));
        assert_eq!(d.replaced, MAX_SYNCING as u64);
        // Progress reports: a counter per node, a restart starts it again.
        let prog = |n: u64| api::RecoveryProgress {
            copied_bytes: n,
            volumes: [("vol".to_string(), n)].into(),
        };
        c.report_recovery("n1", &prog(8 << 20)).await.unwrap();
        c.report_recovery("n1", &prog(12 << 20)).await.unwrap();
        c.report_recovery("n2", &prog(1 << 20)).await.unwrap();
        let d = c.recovery().await.unwrap();
        assert_eq!(d.bytes_copied, 13 << 20);
        assert!(d.rate > 0.0 && d.eta_s.is_some(), "{d:?}");
        assert_eq!(d.volumes[0].bytes_copied, 13 << 20);
        assert!(d.volumes[0].rate > 0.0, "{d:?}");
        assert!(c
            .report_recovery("nobody", &prog(1))
            .await
            .unwrap_err()
            .is_not_found());
        // The lease holder records the copies done: the next pass re-homes the rest.
        let lease = c.acquire_lease("vol", "n1").await.unwrap();
        for (s, n) in &sy {
            c.update_replicas(
                "vol",
                &api::ReplicaUpdate {
                    epoch: lease.epoch,
                    node: n.clone(),
                    in_service: true,
                    sets: Some(vec![*s as u32]),
                },
            )
            .await
            .unwrap();
        }
        let t = std::time::Instant::now();
        loop {
            let cur = c.get_volume("vol").await.unwrap();
            let left = syncing(&cur).len();
            let on3 = cur
                .sets
                .iter()
                .filter(|s| s.members.iter().any(|m| m.node == "n3"))
                .count();
            if on3 == 0 && left == on_n3.len() - MAX_SYNCING {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{cur:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let m = http_get(&addr, "/metrics").await;
        assert!(
            m.contains(&format!(
                "volume_mgr_recovery_degraded_sets {}",
                on_n3.len() - MAX_SYNCING
            )),
            "{m}"
        );
        assert!(
            m.contains("volume_mgr_recovery_bytes_copied_total 13631488"),
            "{m}"
        );
        beats.abort();
        let _ = tx.send(());
        let _ = srv.await;
    }

    /// A plain HTTP/1.0 GET (the body with the head).
    async fn http_get(addr: &str, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
