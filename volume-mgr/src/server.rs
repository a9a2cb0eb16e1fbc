//! The `/v1` HTTP/JSON API (axum). Mutations are serialised and committed to the store before
//! they are acknowledged; liveness (heartbeats) lives in memory, so a heartbeat costs no disk
//! write and a restarted manager sees every node as down until it beats again.
//!
//! Every error is an `api::ApiError` `{code, message}` (one line): 400 `invalid_argument`
//! (bad name, size, address, query, path or JSON), 415 `unsupported_media_type`, 404
//! `not_found` (also unknown routes), 405 `method_not_allowed`, 409 `already_exists`, 409
//! `conflict` (a concurrent change; retry), 409 `stale_lease` (a replica update carrying an
//! epoch that is not the volume's current lease epoch), 409 `in_use` (a VNI, MAC, IP or
//! interface another object has, or a network that still has ports; the message names it),
//! 507 `no_capacity` (chosen over 409: it is the
//! cluster that is short of space, not the request that clashes with state; the message says
//! how much is provisioned of what; also a subnet with no free address), 503
//! `store_unavailable`. A resource named in a request body that does not exist (a port's
//! network or node) is a 400 `invalid_argument`, as for volumes: 404 is for the resource in
//! the path.
//!
//! Overlay networks, ports and vswitches live in [`network`]; load-balanced VIPs in [`vip`].

use crate::api::{self, ApiError};
use crate::metrics::Metrics;
use crate::store::{Cond, Kind, Op, Store, StoreError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) mod backup;
mod cluster;
pub(crate) mod network;
pub(crate) mod update;
pub(crate) mod vip;
pub(crate) mod watch;

/// Largest volume: 1 PiB.
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub listen: String,
    pub data_dir: std::path::PathBuf,
    #[serde(with = "crate::humantime_serde")]
    pub down_after: Duration,
    /// A node down for this long (after `down_after`) has its replicas re-homed.
    #[serde(with = "crate::humantime_serde")]
    pub out_after: Duration,
    /// Provisioned volume bytes allowed per byte of raw disk capacity.
    pub overcommit: f64,
    /// Replicas of a volume created without `replicas`.
    pub default_replicas: u32,
    /// A disk whose used / capacity (as its node's heartbeat reports it) reaches this takes
    /// no new chunks: placement (new volumes, re-homing, drains) skips it.
    #[serde(default = "default_full_ratio")]
    pub full_ratio: f64,
    /// The state store: `embedded` (a redb file in `data_dir`, one manager) or `etcd`
    /// (several managers; controllers on an elected leader).
    #[serde(default = "default_store")]
    pub store: String,
    /// etcd client URLs (with `store = "etcd"`).
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    /// This manager's URL as the others and the agents reach it (its identity in the leader
    /// election) [default: http://LISTEN].
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// Move chunk sets to nodes (or disks) added since they were placed (`recovery`).
    #[serde(default = "default_rebalance")]
    pub rebalance: bool,
    /// A node must be up this long before the rebalancer moves data to it.
    #[serde(with = "crate::humantime_serde", default = "default_rebalance_after")]
    pub rebalance_after: Duration,
    /// Bearer tokens; none: the API is open (see [`crate::auth`]).
    #[serde(default)]
    pub tokens: Vec<crate::auth::Token>,
    /// PEM certificate chain and private key: serve HTTPS (rustls) instead of HTTP.
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
}

fn default_store() -> String {
    "embedded".into()
}

fn default_etcd_prefix() -> String {
    "/fabric/".into()
}

fn default_rebalance() -> bool {
    true
}

fn default_rebalance_after() -> Duration {
    Duration::from_secs(30)
}

fn default_full_ratio() -> f64 {
    0.95
}

/// Free bytes a disk offers placement: none once it is `full_ratio` full (pure).
pub fn placeable_free(capacity: u64, used: u64, full_ratio: f64) -> u64 {
    if capacity == 0 || used as f64 >= capacity as f64 * full_ratio {
        0
    } else {
        capacity.saturating_sub(used)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7700".into(),
            data_dir: "/var/lib/fabric/manager".into(),
            down_after: Duration::from_secs(5),
            out_after: Duration::from_secs(60),
            overcommit: 1.0,
            default_replicas: 3,
            full_ratio: default_full_ratio(),
            store: default_store(),
            etcd_endpoints: Vec::new(),
            etcd_prefix: default_etcd_prefix(),
            advertise_url: None,
            rebalance: default_rebalance(),
            rebalance_after: default_rebalance_after(),
            tokens: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node is up while its last heartbeat is younger than `down_after`.
pub fn node_state(
    last_heartbeat_ms: Option<u64>,
    now_ms: u64,
    down_after: Duration,
) -> api::NodeState {
    match last_heartbeat_ms {
        Some(t) if now_ms.saturating_sub(t) < down_after.as_millis() as u64 => api::NodeState::Up,
        _ => api::NodeState::Down,
    }
}

pub(crate) struct Live {
    pub(crate) last_heartbeat_ms: u64,
    disks: Vec<api::DiskSpec>,
}

pub struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) cfg: Config,
    cluster_id: String,
    /// Store revision of the last volume change (what volume watches wait on).
    pub(crate) volume_rev: tokio::sync::watch::Sender<u64>,
    pub(crate) mutate: tokio::sync::Mutex<()>,
    pub(crate) live: Mutex<HashMap<String, Live>>,
    /// Set once shutdown begins: long-polls answer at once instead of holding it up.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
    pub metrics: Metrics,
    /// Store revision of the last change to networks, ports or switches (including a switch
    /// recorded up or down): what netstate watches wait on.
    net_rev: tokio::sync::watch::Sender<u64>,
    /// Liveness and port counters of the vswitches (memory only, like `live`).
    switch_live: Mutex<HashMap<String, network::SwitchLive>>,
    /// Wakes the switch liveness task (a heartbeat from a switch recorded down).
    switch_wake: tokio::sync::Notify,
    /// When this process opened the state (switches not heard from since keep their recorded
    /// state for `down_after`).
    pub(crate) started_ms: u64,
    /// Re-replication progress (memory only), see [`crate::recovery`].
    pub(crate) recovery: crate::recovery::RecoveryLive,
    /// VIP watch revision and the lb-vip instances' reports (memory only).
    vips: vip::VipLive,
    /// Whether this manager runs the controllers (see [`cluster`]).
    pub(crate) leadership: crate::leader::Leadership,
}

/// An API error: status, stable code, one-line message.
pub struct Error(StatusCode, &'static str, String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ApiError {
                code: self.1.into(),
                message: self.2,
            }),
        )
            .into_response()
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> Error {
    Error(StatusCode::BAD_REQUEST, "invalid_argument", msg.into())
}
pub(crate) fn not_found(msg: impl Into<String>) -> Error {
    Error(StatusCode::NOT_FOUND, "not_found", msg.into())
}
impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(k) => Error(
                StatusCode::CONFLICT,
                "conflict",
                format!("concurrent change to {k}; retry"),
            ),
            StoreError::Backend(m) => {
                tracing::error!(error = %m, "store failure");
                Error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("state store unavailable: {m}"),
                )
            }
            StoreError::Compacted(rev) => Error(
                StatusCode::GONE,
                "compacted",
                format!("history compacted (kept from revision {rev}); list again"),
            ),
        }
    }
}
/// A JSON request body. Every rejection (wrong content type, bad syntax, missing, mistyped or
/// unknown field) comes out as an `ApiError`: 415 `unsupported_media_type` or
/// 400 `invalid_argument`.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(json_err(r)),
        }
    }
}

/// The `{name}` path segment; a bad one (e.g. invalid UTF-8) is a 400 `ApiError`.
pub struct Name(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(n)) => Ok(Name(n)),
            Err(e) => Err(bad(format!("bad path: {}", one_line(&e.body_text())))),
        }
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

fn json_err(r: JsonRejection) -> Error {
    let status = r.status();
    let code = if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        "unsupported_media_type"
    } else {
        "invalid_argument"
    };
    let msg = r
        .body_text()
        .lines()
        .next()
        .unwrap_or("invalid JSON")
        .to_string();
    Error(
        if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            status
        } else {
            StatusCode::BAD_REQUEST
        },
        code,
        msg,
    )
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|e| {
        Error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("corrupt record: {e}"),
        )
    })
}
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("API types serialise")
}

type AppState = Arc<App>;
pub(crate) type ApiResult<T> = Result<T, Error>;

/// Node names follow the volume name rules: 1 to 64 of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-` (host names fit; `.` and `..` could not be addressed in a URL path).
pub(crate) fn validate_node_name(n: &str) -> ApiResult<()> {
    api::validate_volume_name(n).map_err(|e| {
        bad(format!(
            "invalid node name {n:?}: {}",
            e.trim_start_matches("volume name ")
        ))
    })
}

fn validate_addr(what: &str, a: &str, allow_empty: bool) -> ApiResult<()> {
    if (allow_empty && a.is_empty()) || a.parse::<std::net::SocketAddr>().is_ok() {
        Ok(())
    } else {
        Err(bad(format!("{what} {a:?} is not an IP:PORT address")))
    }
}

#[utoipa::path(put, path = "/v1/nodes/{name}", tag = "nodes", params(("name" = String, Path, description = "Node name")), request_body = api::RegisterNode, responses((status = 200, body = api::Node, description = "Registered (or re-registered)")))]
async fn register(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::RegisterNode>,
) -> ApiResult<Json<api::Node>> {
    validate_node_name(&name)?;
    validate_addr("address", &req.address, false)?;
    validate_addr("nbd_address", &req.nbd_address, true)?;
    for d in &req.disks {
        if d.path.is_empty() || d.used > d.capacity {
            return Err(bad(format!(
                "disk {:?}: empty path or used > capacity",
                d.path
            )));
        }
    }
    let _g = app.mutate.lock().await;
    let now = now_ms();
    let old_bytes = app.store.get(Kind::Node, &name)?;
    let old: Option<api::Node> = old_bytes.as_deref().map(decode).transpose()?;
    let node = api::Node {
        name: name.clone(),
        address: req.address,
        nbd_address: req.nbd_address,
        nbd_socket: req.nbd_socket,
        zone: req.zone.unwrap_or_else(|| name.clone()),
        state: api::NodeState::Up,
        last_heartbeat_ms: now,
        registered_ms: old.map(|o| o.registered_ms).unwrap_or(now),
    };
    let mut ops = vec![Op::Put(Kind::Node, name.clone(), encode(&node))];
    let prefix = format!("{name}:");
    for (k, _) in app.store.list(Kind::Disk)?.1 {
        if k.starts_with(&prefix) && !req.disks.iter().any(|d| format!("{prefix}{}", d.path) == k) {
            ops.push(Op::Delete(Kind::Disk, k));
        }
    }
    for d in &req.disks {
        let disk = api::Disk {
            node: name.clone(),
            path: d.path.clone(),
            capacity: d.capacity,
            used: d.used,
        };
        ops.push(Op::Put(
            Kind::Disk,
            format!("{prefix}{}", d.path),
            encode(&disk),
        ));
    }
    // Conditional on the record read above: with several managers, two registrations of one
    // node (or a registration racing `node rm`) cannot both apply.
    app.store
        .commit(&[Cond::Equals(Kind::Node, name.clone(), old_bytes)], &ops)?;
    app.live.lock().unwrap().insert(
        name.clone(),
        Live {
            last_heartbeat_ms: now,
            disks: req.disks,
        },
    );
    tracing::info!(node = %name, "node registered");
    Ok(Json(node))
}

#[utoipa::path(put, path = "/v1/nodes/{name}/heartbeat", tag = "nodes", params(("name" = String, Path, description = "Node name")), request_body = api::Heartbeat, responses((status = 204, description = "Recorded"), (status = 404, body = api::ApiError, description = "not_found")))]
async fn heartbeat(
    State(app): State<AppState>,
    Name(name): Name,
    Body(hb): Body<api::Heartbeat>,
) -> ApiResult<StatusCode> {
    if app.store.get(Kind::Node, &name)?.is_none() {
        return Err(not_found(format!("node {name} is not registered")));
    }
    app.live.lock().unwrap().insert(
        name,
        Live {
            last_heartbeat_ms: now_ms(),
            disks: hb.disks,
        },
    );
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) fn with_liveness(app: &App, mut n: api::Node) -> api::Node {
    let live = app.live.lock().unwrap();
    let hb = live.get(&n.name).map(|l| l.last_heartbeat_ms);
    n.state = node_state(hb, now_ms(), app.cfg.down_after);
    if let Some(t) = hb {
        n.last_heartbeat_ms = t;
    }
    n
}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes", responses((status = 200, body = api::List<api::Node>)))]
async fn list_nodes(State(app): State<AppState>) -> ApiResult<Json<api::List<api::Node>>> {
    let (revision, items) = app.store.list(Kind::Node)?;
    let items = items
        .iter()
        .map(|(_, b)| decode(b).map(|n| with_liveness(&app, n)))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(api::List { revision, items }))
}

#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "nodes", params(("name" = String, Path, description = "Node name")), responses((status = 200, body = api::Node), (status = 404, body = api::ApiError, description = "not_found")))]
async fn get_node(State(app): State<AppState>, Name(name): Name) -> ApiResult<Json<api::Node>> {
    let b = app
        .store
        .get(Kind::Node, &name)?
        .ok_or_else(|| not_found(format!("node {name} not found")))?;
    Ok(Json(with_liveness(&app, decode(&b)?)))
}

pub(crate) fn disks(app: &App) -> ApiResult<(u64, Vec<api::Disk>)> {
    let (revision, items) = app.store.list(Kind::Disk)?;
    let live = app.live.lock().unwrap();
    let mut out = Vec::new();
    for (_, b) in items {
        let mut d: api::Disk = decode(&b)?;
        if let Some(s) = live
            .get(&d.node)
            .and_then(|l| l.disks.iter().find(|s| s.path == d.path))
        {
            d.used = s.used;
            d.capacity = s.capacity;
        }
        out.push(d);
    }
    Ok((revision, out))
}

#[utoipa::path(get, path = "/v1/disks", tag = "nodes", responses((status = 200, body = api::List<api::Disk>)))]
async fn list_disks(State(app): State<AppState>) -> ApiResult<Json<api::List<api::Disk>>> {
    let (revision, items) = disks(&app)?;
    Ok(Json(api::List { revision, items }))
}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = api::CreateVolume, responses((status = 201, body = api::Volume, description = "Created"), (status = 409, body = api::ApiError, description = "already_exists, or conflict (a concurrent change; retry)"), (status = 507, body = api::ApiError, description = "no_capacity")))]
async fn create_volume(
    State(app): State<AppState>,
    Body(req): Body<api::CreateVolume>,
) -> ApiResult<(StatusCode, Json<api::Volume>)> {
    api::validate_volume_name(&req.name).map_err(bad)?;
    if req.size == 0 || req.size % 4096 != 0 {
        return Err(bad(format!(
            "size {} is not a positive multiple of 4096 bytes",
            req.size
        )));
    }
    if req.size > MAX_VOLUME_SIZE {
        return Err(bad(format!(
            "size {} exceeds the maximum of 1 PiB",
            req.size
        )));
    }
    let replicas = req.replicas.unwrap_or(app.cfg.default_replicas);
    if !(1..=16).contains(&replicas) {
        return Err(bad(format!("replicas must be 1 to 16, got {replicas}")));
    }
    let min_replicas = req.min_replicas.unwrap_or(replicas.min(2));
    if !(1..=replicas).contains(&min_replicas) {
        return Err(bad(format!(
            "min_replicas must be 1 to replicas ({replicas}), got {min_replicas}"
        )));
    }
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Volume, &req.name)?.is_some() {
        return Err(Error(
            StatusCode::CONFLICT,
            "already_exists",
            format!("volume {} already exists", req.name),
        ));
    }
    let (_, ds) = disks(&app)?;
    let capacity = ds.iter().fold(0u64, |a, d| a.saturating_add(d.capacity));
    if capacity == 0 {
        return Err(Error(
            StatusCode::INSUFFICIENT_STORAGE,
            "no_capacity",
            "no disks registered: start blockd with --disk".into(),
        ));
    }
    // The provisioned total is kept in `meta/provisioned` (updated by every create and delete
    // under a condition), so a create does not read every volume; a store without it (older,
    // or restored) sums the volumes once.
    let prov_cur = app.store.get(Kind::Meta, PROVISIONED)?;
    let provisioned = match &prov_cur {
        Some(b) => decode::<u64>(b)?,
        None => provisioned_sum(&app)?,
    };
    let want = req.size.saturating_mul(replicas as u64);
    let limit = (capacity as f64 * app.cfg.overcommit) as u64;
    if provisioned.saturating_add(want) > limit {
        return Err(Error(
            StatusCode::INSUFFICIENT_STORAGE,
            "no_capacity",
            format!(
                "no capacity for {} x {replicas} {} ({} of disk): {} of {} already provisioned (disk capacity {}, overcommit {})",
                api::human_bytes(req.size),
                if replicas == 1 { "replica" } else { "replicas" },
                api::human_bytes(want),
                api::human_bytes(provisioned),
                api::human_bytes(limit),
                api::human_bytes(capacity),
                app.cfg.overcommit
            ),
        ));
    }
    let candidates = placement_candidates(&app, &ds)?;
    check_domains(&candidates, replicas)?;
    let cur = app.store.get(Kind::Meta, "next_volume_id")?;
    let id = match &cur {
        Some(b) => decode::<u64>(b)?,
        None => 1,
    };
    let chunks = req.size.div_ceil(api::DEFAULT_CHUNK_SIZE);
    let nsets = chunks.clamp(1, MAX_SETS);
    let mut sets = Vec::with_capacity(nsets as usize);
    for s in 0..nsets {
        let nodes = crate::placement::place(id, s, &candidates, replicas as usize)
            .map_err(|e| no_capacity(format!("cannot place {replicas} replicas: {e}")))?;
        sets.push(api::ChunkSet {
            members: nodes
                .into_iter()
                .map(|node| api::Member {
                    node,
                    in_service: true,
                })
                .collect(),
        });
    }
    let vol = api::Volume {
        name: req.name.clone(),
        id,
        size: req.size,
        chunk_size: api::DEFAULT_CHUNK_SIZE,
        replicas,
        min_replicas,
        sets,
        created_ms: now_ms(),
    };
    // Every create is conditional on `next_volume_id` (so two managers creating at once never
    // both pass the capacity check), and on the record of every node it places data on (so a
    // concurrent `node rm` cannot remove a node this volume is about to use).
    let mut conds = vec![
        Cond::Equals(Kind::Volume, req.name.clone(), None),
        Cond::Equals(Kind::Meta, "next_volume_id".into(), cur),
        Cond::Equals(Kind::Meta, PROVISIONED.into(), prov_cur),
    ];
    let mut used: Vec<&str> = vol
        .sets
        .iter()
        .flat_map(|s| s.members.iter().map(|m| m.node.as_str()))
        .collect();
    used.sort_unstable();
    used.dedup();
    for n in used {
        conds.push(Cond::Equals(
            Kind::Node,
            n.to_string(),
            app.store.get(Kind::Node, n)?,
        ));
    }
    let rev = app.store.commit(
        &conds,
        &[
            Op::Put(Kind::Volume, req.name.clone(), encode(&vol)),
            Op::Put(Kind::Meta, "next_volume_id".into(), encode(&(id + 1))),
            Op::Put(
                Kind::Meta,
                PROVISIONED.into(),
                encode(&provisioned.saturating_add(want)),
            ),
        ],
    )?;
    app.volume_rev.send_replace(rev);
    tracing::info!(volume = %vol.name, id, size = vol.size, replicas, sets = vol.sets.len(), "volume created");
    Ok((StatusCode::CREATED, Json(vol)))
}

fn no_capacity(msg: String) -> Error {
    Error(StatusCode::INSUFFICIENT_STORAGE, "no_capacity", msg)
}

/// Refuses (507) when fewer than `replicas` failure domains (zones) have an up node with
/// free space; the message names the domains there are.
fn check_domains(candidates: &[crate::placement::Candidate], replicas: u32) -> ApiResult<()> {
    let mut zones: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for c in candidates.iter().filter(|c| c.weight > 0.0) {
        zones.entry(&c.zone).or_default().push(&c.name);
    }
    if zones.len() >= replicas as usize {
        return Ok(());
    }
    let have = if zones.is_empty() {
        "none (no node is up with free disk space)".to_string()
    } else {
        zones
            .iter()
            .map(|(z, nodes)| {
                if nodes.len() == 1 && nodes[0] == *z {
                    z.to_string()
                } else {
                    format!("{z} ({})", nodes.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(no_capacity(format!(
        "need {replicas} failure domains (zones) with free capacity for {replicas} replicas, only {} available: {have}",
        zones.len()
    )))
}

/// Key (in `Kind::Meta`) of a node's durable drain mark.
pub(crate) fn drain_key(node: &str) -> String {
    format!("draining/{node}")
}

/// Whether `node` is marked draining (placement never picks it; its replicas move away).
pub(crate) fn is_draining(app: &App, node: &str) -> ApiResult<bool> {
    Ok(app.store.get(Kind::Meta, &drain_key(node))?.is_some())
}

/// Volumes (name, set count) that list `node` in a chunk set.
fn volumes_on(app: &App, node: &str) -> ApiResult<Vec<String>> {
    let mut out = Vec::new();
    for (name, b) in app.store.list(Kind::Volume)?.1 {
        let v: api::Volume = decode(&b)?;
        let n = v
            .sets
            .iter()
            .filter(|s| s.members.iter().any(|m| m.node == node))
            .count();
        if n > 0 {
            out.push(format!("{name} ({n} sets)"));
        }
    }
    Ok(out)
}

/// `POST /v1/nodes/{name}/drain`: marks the node draining (durably). Placement skips it and
/// the recovery controller moves every replica it holds to other nodes, keeping its copy in
/// service until the new one is. Answers what is left to move.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", tag = "nodes", params(("name" = String, Path, description = "Node name")), responses((status = 200, body = api::NodeDrain), (status = 404, body = api::ApiError, description = "not_found")))]
async fn drain_node(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<Json<api::NodeDrain>> {
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Node, &name)?.is_none() {
        return Err(not_found(format!("node {name} is not registered")));
    }
    if !is_draining(&app, &name)? {
        app.store
            .commit(&[], &[Op::Put(Kind::Meta, drain_key(&name), encode(&true))])?;
        tracing::info!(node = %name, "node marked draining");
    }
    Ok(Json(api::NodeDrain {
        node: name.clone(),
        draining: true,
        volumes: volumes_on(&app, &name)?,
    }))
}

/// `DELETE /v1/nodes/{name}`: removes the node's record (and its disks and drain mark).
/// Refused (409 `node_in_use`, naming the volumes) while any chunk set lists the node.
#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes", params(("name" = String, Path, description = "Node name")), responses((status = 204, description = "Removed"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "node_in_use: the node still holds replicas")))]
async fn remove_node(State(app): State<AppState>, Name(name): Name) -> ApiResult<StatusCode> {
    let _g = app.mutate.lock().await;
    let Some(cur) = app.store.get(Kind::Node, &name)? else {
        return Err(not_found(format!("node {name} is not registered")));
    };
    let next_id = app.store.get(Kind::Meta, "next_volume_id")?;
    let vols = volumes_on(&app, &name)?;
    if !vols.is_empty() {
        return Err(Error(
            StatusCode::CONFLICT,
            "node_in_use",
            format!(
                "node {name} still holds replicas of {}; drain it first (fabctl node drain {name})",
                vols.join(", ")
            ),
        ));
    }
    let mut ops = vec![
        Op::Delete(Kind::Node, name.clone()),
        Op::Delete(Kind::Meta, drain_key(&name)),
    ];
    let prefix = format!("{name}:");
    for (k, _) in app.store.list(Kind::Disk)?.1 {
        if k.starts_with(&prefix) {
            ops.push(Op::Delete(Kind::Disk, k));
        }
    }
    // Conditional on the node record and on `next_volume_id`, both read before the check
    // above: a volume created meanwhile (by another manager) moves `next_volume_id` and
    // conditions itself on this record, so a create and a removal never both apply.
    app.store.commit(
        &[
            Cond::Equals(Kind::Node, name.clone(), Some(cur)),
            Cond::Equals(Kind::Meta, "next_volume_id".into(), next_id),
        ],
        &ops,
    )?;
    app.live.lock().unwrap().remove(&name);
    tracing::info!(node = %name, "node removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Key (in `Kind::Meta`) of the provisioned total: the sum of size x replicas of all volumes.
const PROVISIONED: &str = "provisioned";

/// The provisioned total from the volumes themselves.
fn provisioned_sum(app: &App) -> ApiResult<u64> {
    let (_, vols) = app.store.list(Kind::Volume)?;
    let mut provisioned = 0u64;
    for (_, b) in &vols {
        let v = decode::<api::Volume>(b)?;
        provisioned = provisioned.saturating_add(v.size.saturating_mul(v.replicas.max(1) as u64));
    }
    Ok(provisioned)
}

/// Most chunk sets per volume (each is placed on its own R nodes).
pub const MAX_SETS: u64 = 32;

/// Up nodes with free space, weighted by it, in their zones.
pub(crate) fn placement_candidates(
    app: &App,
    ds: &[api::Disk],
) -> ApiResult<Vec<crate::placement::Candidate>> {
    let (_, nodes) = app.store.list(Kind::Node)?;
    let mut out = Vec::new();
    for (_, b) in nodes {
        let n = with_liveness(app, decode::<api::Node>(&b)?);
        if n.state != api::NodeState::Up || is_draining(app, &n.name)? {
            continue;
        }
        let free: u64 = ds
            .iter()
            .filter(|d| d.node == n.name)
            .map(|d| placeable_free(d.capacity, d.used, app.cfg.full_ratio))
            .sum();
        if free == 0 {
            continue;
        }
        out.push(crate::placement::Candidate {
            zone: n.zone.clone(),
            name: n.name,
            weight: free as f64,
        });
    }
    Ok(out)
}

/// The lease holder records a replica in or out of service (durably, before it acts on it).
/// The last in-service replica of a set is never recorded out: it is the only copy known to
/// hold every acknowledged write.
#[utoipa::path(post, path = "/v1/volumes/{name}/replicas", tag = "volumes", params(("name" = String, Path, description = "Volume name")), request_body = api::ReplicaUpdate, responses((status = 200, body = api::Volume), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "stale_lease, or conflict (a concurrent change; retry)")))]
async fn update_replicas(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::ReplicaUpdate>,
) -> ApiResult<Json<api::Volume>> {
    let _g = app.mutate.lock().await;
    let cur_v = app
        .store
        .get(Kind::Volume, &name)?
        .ok_or_else(|| not_found(format!("volume {name} not found")))?;
    let cur_l = app.store.get(Kind::Lease, &name)?;
    let lease: Option<api::Lease> = cur_l.as_deref().map(decode).transpose()?;
    match &lease {
        Some(l) if l.epoch == req.epoch => {}
        Some(l) => {
            return Err(Error(
                StatusCode::CONFLICT,
                "stale_lease",
                format!(
                    "epoch {} is stale: {} holds the lease of {name} with epoch {}",
                    req.epoch, l.holder, l.epoch
                ),
            ))
        }
        None => {
            return Err(Error(
                StatusCode::CONFLICT,
                "stale_lease",
                format!("volume {name} has no lease"),
            ))
        }
    }
    let mut vol: api::Volume = decode(&cur_v)?;
    if !vol
        .sets
        .iter()
        .any(|s| s.members.iter().any(|m| m.node == req.node))
    {
        return Err(bad(format!(
            "node {} holds no replica of volume {name}",
            req.node
        )));
    }
    let indices: Vec<usize> = match &req.sets {
        None => (0..vol.sets.len()).collect(),
        Some(v) => {
            if let Some(bad_set) = v.iter().find(|s| **s as usize >= vol.sets.len()) {
                return Err(bad(format!(
                    "set {bad_set} does not exist (volume {name} has {} sets)",
                    vol.sets.len()
                )));
            }
            v.iter().map(|s| *s as usize).collect()
        }
    };
    let mut changed = 0;
    let mut kept = Vec::new();
    for i in indices {
        let set = &mut vol.sets[i];
        let others_in = set
            .members
            .iter()
            .filter(|m| m.in_service && m.node != req.node)
            .count();
        if let Some(m) = set.members.iter_mut().find(|m| m.node == req.node) {
            if m.in_service == req.in_service {
                continue;
            }
            if !req.in_service && others_in == 0 {
                kept.push(i);
                continue;
            }
            m.in_service = req.in_service;
            changed += 1;
        }
    }
    if !kept.is_empty() {
        tracing::warn!(volume = %name, node = %req.node, sets = ?kept, "not recording the last in-service replica out of service");
    }
    if changed == 0 {
        return Ok(Json(vol));
    }
    let rev = app.store.commit(
        &[
            Cond::Equals(Kind::Volume, name.clone(), Some(cur_v)),
            Cond::Equals(Kind::Lease, name.clone(), cur_l),
        ],
        &[Op::Put(Kind::Volume, name.clone(), encode(&vol))],
    )?;
    app.volume_rev.send_replace(rev);
    tracing::info!(volume = %name, node = %req.node, in_service = req.in_service, sets = changed, epoch = req.epoch, "replica state recorded");
    Ok(Json(vol))
}

#[utoipa::path(get, path = "/v1/leases", tag = "volumes", responses((status = 200, body = api::List<api::Lease>)))]
async fn list_leases(State(app): State<AppState>) -> ApiResult<Json<api::List<api::Lease>>> {
    let (revision, items) = app.store.list(Kind::Lease)?;
    let items = items
        .iter()
        .map(|(_, b)| decode(b))
        .collect::<ApiResult<Vec<api::Lease>>>()?;
    Ok(Json(api::List { revision, items }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    after_revision: Option<u64>,
    timeout_ms: Option<u64>,
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", params(("after_revision" = Option<u64>, Query, description = "Long-poll: answer once the revision is past this"), ("timeout_ms" = Option<u64>, Query, description = "Long-poll limit, default 30000, at most 60000")), responses((status = 200, body = api::List<api::Volume>)))]
async fn list_volumes(
    State(app): State<AppState>,
    q: Result<Query<WatchQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<api::List<api::Volume>>> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    if let Some(after) = q.after_revision {
        let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(60_000));
        let mut rx = app.volume_rev.subscribe();
        let mut stop = app.stopping.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(timeout, rx.wait_for(|r| *r > after)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
    let (revision, items) = app.store.list(Kind::Volume)?;
    let items = items
        .iter()
        .map(|(_, b)| decode(b))
        .collect::<ApiResult<Vec<api::Volume>>>()?;
    Ok(Json(api::List { revision, items }))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes", params(("name" = String, Path, description = "Volume name")), responses((status = 200, body = api::Volume), (status = 404, body = api::ApiError, description = "not_found")))]
async fn get_volume(State(app): State<AppState>, Name(name): Name) -> ApiResult<Json<api::Volume>> {
    let b = app
        .store
        .get(Kind::Volume, &name)?
        .ok_or_else(|| not_found(format!("volume {name} not found")))?;
    Ok(Json(decode(&b)?))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes", params(("name" = String, Path, description = "Volume name")), responses((status = 204, description = "Deleted (with its lease)"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
async fn delete_volume(State(app): State<AppState>, Name(name): Name) -> ApiResult<StatusCode> {
    let _g = app.mutate.lock().await;
    let cur = app
        .store
        .get(Kind::Volume, &name)?
        .ok_or_else(|| not_found(format!("volume {name} not found")))?;
    // The lease goes with the volume (a re-created volume has a new id, so no replica can
    // confuse its epochs with the old one's).
    let v: api::Volume = decode(&cur)?;
    let mut conds = vec![Cond::Equals(Kind::Volume, name.clone(), Some(cur))];
    let mut ops = vec![
        Op::Delete(Kind::Volume, name.clone()),
        Op::Delete(Kind::Lease, name.clone()),
    ];
    if let Some(b) = app.store.get(Kind::Meta, PROVISIONED)? {
        let total: u64 = decode(&b)?;
        let mine = v.size.saturating_mul(v.replicas.max(1) as u64);
        conds.push(Cond::Equals(Kind::Meta, PROVISIONED.into(), Some(b)));
        ops.push(Op::Put(
            Kind::Meta,
            PROVISIONED.into(),
            encode(&total.saturating_sub(mine)),
        ));
    }
    let rev = app.store.commit(&conds, &ops)?;
    app.volume_rev.send_replace(rev);
    tracing::info!(volume = %name, "volume deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Grants the volume's writer lease to `node`. The holder re-asking keeps its epoch (a
/// re-attach); any other node takes the lease over with the next epoch (migration, failover).
/// The new epoch is durable before it is returned, so no two holders ever share an epoch.
#[utoipa::path(post, path = "/v1/volumes/{name}/lease", tag = "volumes", params(("name" = String, Path, description = "Volume name")), request_body = api::LeaseRequest, responses((status = 200, body = api::Lease), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
async fn acquire_lease(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::LeaseRequest>,
) -> ApiResult<Json<api::Lease>> {
    validate_node_name(&req.node)?;
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Volume, &name)?.is_none() {
        return Err(not_found(format!("volume {name} not found")));
    }
    let cur = app.store.get(Kind::Lease, &name)?;
    let old: Option<api::Lease> = cur.as_deref().map(decode).transpose()?;
    if let Some(l) = &old {
        if l.holder == req.node {
            return Ok(Json(l.clone()));
        }
    }
    let lease = api::Lease {
        volume: name.clone(),
        holder: req.node.clone(),
        epoch: old.as_ref().map(|l| l.epoch + 1).unwrap_or(1),
        acquired_ms: now_ms(),
    };
    app.store.commit(
        &[Cond::Equals(Kind::Lease, name.clone(), cur)],
        &[Op::Put(Kind::Lease, name.clone(), encode(&lease))],
    )?;
    tracing::info!(volume = %name, holder = %lease.holder, epoch = lease.epoch, previous = ?old.map(|l| l.holder), "lease granted");
    Ok(Json(lease))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/lease", tag = "volumes", params(("name" = String, Path, description = "Volume name")), responses((status = 200, body = api::Lease), (status = 404, body = api::ApiError, description = "not_found")))]
async fn get_lease(State(app): State<AppState>, Name(name): Name) -> ApiResult<Json<api::Lease>> {
    let b = app
        .store
        .get(Kind::Lease, &name)?
        .ok_or_else(|| not_found(format!("volume {name} has no lease")))?;
    Ok(Json(decode(&b)?))
}

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster", responses((status = 200, body = api::ClusterInfo)))]
async fn cluster(State(app): State<AppState>) -> ApiResult<Json<api::ClusterInfo>> {
    Ok(Json(api::ClusterInfo {
        // From the store: a restore (or another manager) may have set it since start-up.
        cluster_id: match app.store.get(Kind::Meta, "cluster_id")? {
            Some(b) => String::from_utf8_lossy(&b).into_owned(),
            None => app.cluster_id.clone(),
        },
        revision: app.store.revision()?,
        store: app.cfg.store.clone(),
        manager: app.leadership.id().to_string(),
        leader: app.leader(),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "cluster", responses((status = 200, content_type = "text/plain", body = String, description = "Prometheus text format")))]
async fn metrics(State(app): State<AppState>) -> Response {
    let mut out = String::new();
    app.metrics.render(&mut out);
    let now = now_ms();
    let (mut up, mut down) = (0, 0);
    if let Ok((_, nodes)) = app.store.list(Kind::Node) {
        let live = app.live.lock().unwrap();
        for (name, _) in nodes {
            match node_state(
                live.get(&name).map(|l| l.last_heartbeat_ms),
                now,
                app.cfg.down_after,
            ) {
                api::NodeState::Up => up += 1,
                api::NodeState::Down => down += 1,
            }
        }
    }
    let vols = app
        .store
        .list(Kind::Volume)
        .map(|(_, v)| v.len())
        .unwrap_or(0);
    let rev = app.store.revision().unwrap_or(0);
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP volume_mgr_nodes Nodes by state.\n# TYPE volume_mgr_nodes gauge\nvolume_mgr_nodes{{state=\"up\"}} {up}\nvolume_mgr_nodes{{state=\"down\"}} {down}");
    let _ = writeln!(out, "# HELP volume_mgr_volumes Volumes.\n# TYPE volume_mgr_volumes gauge\nvolume_mgr_volumes {vols}");
    crate::recovery::render_metrics(&app, &mut out);
    network::render_metrics(&app, &mut out);
    vip::render_metrics(&app, &mut out);
    let _ = writeln!(out, "# HELP volume_mgr_store_revision Store revision.\n# TYPE volume_mgr_store_revision gauge\nvolume_mgr_store_revision {rev}");
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

async fn count(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    app.metrics.count(&method, &route, resp.status().as_u16());
    resp
}

/// Builds the router (exposed for in-process tests).
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/nodes", get(list_nodes))
        .route(
            "/v1/nodes/{name}",
            put(register).get(get_node).delete(remove_node),
        )
        .route("/v1/nodes/{name}/drain", post(drain_node))
        .route("/v1/nodes/{name}/heartbeat", put(heartbeat))
        .route("/v1/disks", get(list_disks))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(get_volume)
                .delete(delete_volume)
                .patch(update::update_volume),
        )
        .route(
            "/v1/volumes/{name}/replicas",
            axum::routing::post(update_replicas),
        )
        .route("/v1/leases", get(list_leases))
        .route("/v1/recovery", get(crate::recovery::get_recovery))
        .route(
            "/v1/recovery/progress/{name}",
            put(crate::recovery::report_progress),
        )
        .route(
            "/v1/volumes/{name}/lease",
            axum::routing::post(acquire_lease).get(get_lease),
        )
        .route(
            "/v1/networks",
            get(network::list_networks).post(network::create_network),
        )
        .route(
            "/v1/networks/{name}",
            get(network::get_network)
                .delete(network::delete_network)
                .patch(update::update_network),
        )
        .route(
            "/v1/ports",
            get(network::list_ports).post(network::create_port),
        )
        .route(
            "/v1/ports/{name}",
            get(network::get_port).delete(network::delete_port),
        )
        .route("/v1/ports/{name}/node", put(network::move_port))
        .route("/v1/switches", get(network::list_switches))
        .route(
            "/v1/switches/{name}",
            put(network::register_switch).get(update::get_switch),
        )
        .route(
            "/v1/switches/{name}/heartbeat",
            put(network::switch_heartbeat),
        )
        .route("/v1/netstate", get(network::net_state))
        .route("/v1/vips", get(vip::list_vips).post(vip::create_vip))
        .route("/v1/vips/{name}", get(vip::get_vip).delete(vip::delete_vip))
        .route(
            "/v1/vips/{name}/backends",
            axum::routing::post(vip::add_backend),
        )
        .route(
            "/v1/vips/{name}/backends/{addr}",
            axum::routing::delete(vip::remove_backend),
        )
        .route(
            "/v1/vips/{name}/backends/{addr}/drain",
            axum::routing::post(vip::drain_backend),
        )
        .route("/v1/vips/{name}/status/{node}", put(vip::report))
        .route(
            "/v1/vips/{name}/lease",
            axum::routing::post(vip::acquire_lease).delete(vip::release_lease),
        )
        .route("/v1/watch", get(watch::watch))
        .route("/v1/backup", get(backup::backup))
        .route(
            "/v1/restore",
            post(backup::restore).layer(axum::extract::DefaultBodyLimit::max(1 << 30)),
        )
        .route("/v1/openapi.json", get(crate::openapi::openapi_json))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { Error(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            Error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(app.cfg.tokens.clone()),
            crate::auth::check,
        ))
        .layer(axum::middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

/// Opens the store under `cfg.data_dir` (creating it) and builds the application.
pub fn open(cfg: Config) -> Result<Arc<App>, String> {
    let id = cfg
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.listen));
    match cfg.store.as_str() {
        "embedded" => {
            std::fs::create_dir_all(&cfg.data_dir)
                .map_err(|e| format!("data dir {}: {e}", cfg.data_dir.display()))?;
            let store = crate::store::RedbStore::open(&cfg.data_dir.join("state.redb"))
                .map_err(|e| e.to_string())?;
            let l = crate::leader::Leadership::embedded(&id);
            open_with(cfg, Arc::new(store), l)
        }
        "etcd" => {
            let store = crate::etcd_store::EtcdStore::connect(
                &cfg.etcd_endpoints,
                &cfg.etcd_prefix,
                Duration::from_secs(2),
            )
            .map_err(|e| format!("etcd {}: {e}", cfg.etcd_endpoints.join(",")))?;
            let l = crate::leader::Leadership::etcd(&store, &id, crate::leader::DEFAULT_TTL)
                .map_err(|e| e.to_string())?;
            open_with(cfg, Arc::new(store), l)
        }
        o => Err(format!("store {o:?}: use embedded or etcd")),
    }
}

/// The application over `store` as its only manager (always the leader).
pub fn open_with_store(cfg: Config, store: Arc<dyn Store>) -> Result<Arc<App>, String> {
    let id = format!("http://{}", cfg.listen);
    open_with(cfg, store, crate::leader::Leadership::embedded(&id))
}

pub fn open_with(
    cfg: Config,
    store: Arc<dyn Store>,
    leadership: crate::leader::Leadership,
) -> Result<Arc<App>, String> {
    if !(cfg.overcommit > 0.0 && cfg.overcommit.is_finite()) {
        return Err(format!(
            "overcommit must be a positive number, got {}",
            cfg.overcommit
        ));
    }
    let cluster_id = match store
        .get(Kind::Meta, "cluster_id")
        .map_err(|e| e.to_string())?
    {
        Some(b) => String::from_utf8_lossy(&b).into_owned(),
        None => {
            let id = new_cluster_id();
            store
                .commit(
                    &[Cond::Equals(Kind::Meta, "cluster_id".into(), None)],
                    &[Op::Put(
                        Kind::Meta,
                        "cluster_id".into(),
                        id.clone().into_bytes(),
                    )],
                )
                .map_err(|e| e.to_string())?;
            id
        }
    };
    let rev = store.revision().map_err(|e| e.to_string())?;
    let (volume_rev, _) = tokio::sync::watch::channel(rev);
    let (net_rev, _) = tokio::sync::watch::channel(rev);
    Ok(Arc::new(App {
        store,
        cfg,
        cluster_id,
        volume_rev,
        mutate: tokio::sync::Mutex::new(()),
        live: Mutex::new(HashMap::new()),
        stopping: tokio::sync::watch::channel(false).0,
        metrics: Metrics::default(),
        net_rev,
        switch_live: Mutex::new(HashMap::new()),
        switch_wake: tokio::sync::Notify::new(),
        started_ms: now_ms(),
        recovery: Default::default(),
        vips: vip::VipLive::new(rev),
        leadership,
    }))
}

fn new_cluster_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let t = now_ms();
    b[..8]
        .iter_mut()
        .zip(t.to_le_bytes())
        .for_each(|(x, y)| *x ^= y);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Opens the state under `cfg.data_dir` and serves the API on `listener` (HTTPS when
/// `tls_cert` and `tls_key` are set) until `shutdown` resolves; then stops accepting, answers
/// pending long-polls at once, lets in-flight requests finish and returns. Every acknowledged
/// change is already durable, so there is nothing to flush.
pub async fn serve(
    cfg: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    crate::auth::validate(&cfg.tokens)?;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::server_config(c, k).await?),
        (None, None) => None,
        _ => return Err("tls-cert and tls-key go together".into()),
    };
    let app = open(cfg)?;
    tracing::info!(addr = ?listener.local_addr().ok(), cluster_id = %app.cluster_id, tls = tls.is_some(), auth = !app.cfg.tokens.is_empty(), "volume-mgr serving");
    let stopping = app.clone();
    tokio::spawn(network::switch_liveness(app.clone()));
    tokio::spawn(crate::recovery::controller(app.clone()));
    tokio::spawn(cluster::follow_store(app.clone()));
    if app.cfg.store != "embedded" {
        tokio::spawn(cluster::share_liveness(app.clone()));
    }
    let stop = async move {
        shutdown.await;
        tracing::info!("volume-mgr shutting down");
        stopping.stopping.send_replace(true);
    };
    match tls {
        None => axum::serve(listener, router(app))
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| e.to_string()),
        Some(tls) => {
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                stop.await;
                h.graceful_shutdown(None);
            });
            let std_listener = listener.into_std().map_err(|e| e.to_string())?;
            axum_server::from_tcp_rustls(std_listener, tls)
                .handle(handle)
                .serve(router(app).into_make_service())
                .await
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_from_heartbeats() {
        let d = Duration::from_secs(5);
        assert_eq!(node_state(Some(10_000), 14_999, d), api::NodeState::Up);
        assert_eq!(node_state(Some(10_000), 15_000, d), api::NodeState::Down);
        assert_eq!(node_state(None, 0, d), api::NodeState::Down);
        assert_eq!(node_state(Some(20_000), 10_000, d), api::NodeState::Up); // clock skew
    }
}
