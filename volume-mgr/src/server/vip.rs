//! Load-balanced VIPs and their backends (issue 5).
//!
//! Every write is one store commit whose conditions make it a compare-and-swap: a VIP's
//! address and protocol are claimed by an index key (`Kind::VipIndex`) that must be absent, a
//! VIP on an overlay network requires the network record unchanged, and a backend change
//! requires the VIP record unchanged. Within one manager the writes are serialised as well. The
//! checks themselves are pure code in `crate::vip`.
//!
//! Reports of the lb-vip instances (`PUT /v1/vips/{name}/status/{node}`) live in memory, like
//! switch heartbeats: they cost no write, do not wake watches, and a report older than
//! `down_after` is left out of answers.

use super::{
    bad, decode, encode, not_found, now_ms, one_line, validate_node_name, ApiResult, App, AppState,
    Body, Error, Name, WatchQuery,
};
use crate::api;
use crate::store::{Cond, Kind, Op};
use crate::vip::{self as rules, VipError};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// What the manager keeps about VIPs besides the store.
pub(super) struct VipLive {
    /// Store revision of the last change to a VIP or its backends (what VIP watches wait on).
    pub(super) rev: tokio::sync::watch::Sender<u64>,
    /// Last report of each instance: VIP name → node → (received ms, report).
    reports: Mutex<HashMap<String, rules::Reports>>,
}

impl VipLive {
    pub(super) fn new(revision: u64) -> VipLive {
        VipLive {
            rev: tokio::sync::watch::channel(revision).0,
            reports: Mutex::new(HashMap::new()),
        }
    }
}

/// Index key of a VIP's address and protocol (in `Kind::VipIndex`).
fn addr_key(proto: api::VipProto, addr: &str) -> String {
    format!("addr/{proto}/{addr}")
}

fn vip_bad(e: VipError) -> Error {
    bad(e.to_string())
}
fn conflict(code: &'static str, msg: String) -> Error {
    Error(StatusCode::CONFLICT, code, msg)
}

/// The `{name}/…/{other}` path segments of the backend and status routes.
pub(super) struct Name2(String, String);

impl<S: Send + Sync> FromRequestParts<S> for Name2 {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((a, b))) => Ok(Name2(a, b)),
            Err(e) => Err(bad(format!("bad path: {}", one_line(&e.body_text())))),
        }
    }
}

/// The VIP with its fresh reports and its lease.
fn with_reports(app: &App, mut v: api::Vip) -> api::Vip {
    v.lease = match app.store.get(Kind::VipLease, &v.name) {
        Ok(b) => b.and_then(|b| decode(&b).ok()),
        Err(e) => {
            tracing::warn!(vip = %v.name, error = %e, "cannot read the vip's lease");
            None
        }
    };
    with_fresh_reports(app, v)
}

/// The VIP with its fresh reports (the lease as it is).
fn with_fresh_reports(app: &App, mut v: api::Vip) -> api::Vip {
    let max_age = app.cfg.down_after.as_millis() as u64;
    v.reports = app
        .vips
        .reports
        .lock()
        .unwrap()
        .get(&v.name)
        .map(|r| rules::fresh_reports(r, now_ms(), max_age))
        .unwrap_or_default();
    v
}

fn vip_not_found(name: &str) -> Error {
    not_found(format!("vip {name} not found"))
}

/// The stored record of VIP `name` and the VIP it holds.
fn load(app: &App, name: &str) -> ApiResult<(Vec<u8>, api::Vip)> {
    let cur = app
        .store
        .get(Kind::Vip, name)?
        .ok_or_else(|| vip_not_found(name))?;
    let v = decode(&cur)?;
    Ok((cur, v))
}

/// Replaces VIP `name` if its record is still `cur`; wakes watches.
fn store_vip(app: &App, cur: Vec<u8>, v: &api::Vip) -> ApiResult<()> {
    let mut stored = v.clone();
    stored.reports.clear();
    stored.lease = None;
    let rev = app.store.commit(
        &[Cond::Equals(Kind::Vip, v.name.clone(), Some(cur))],
        &[Op::Put(Kind::Vip, v.name.clone(), encode(&stored))],
    )?;
    app.vips.rev.send_replace(rev);
    Ok(())
}

#[utoipa::path(post, path = "/v1/vips", tag = "vips", request_body = api::CreateVip, responses((status = 201, body = api::Vip, description = "Created"), (status = 409, body = api::ApiError, description = "already_exists, in_use (the address) or conflict")))]
pub(super) async fn create_vip(
    State(app): State<AppState>,
    Body(req): Body<api::CreateVip>,
) -> ApiResult<(StatusCode, Json<api::Vip>)> {
    let v = rules::check_vip(&req, now_ms()).map_err(vip_bad)?;
    let addr: SocketAddr = v
        .addr
        .parse()
        .map_err(|_| bad(format!("addr {:?} is not an IP:PORT address", v.addr)))?;
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Vip, &v.name)?.is_some() {
        return Err(conflict(
            "already_exists",
            format!("vip {} already exists", v.name),
        ));
    }
    let key = addr_key(v.proto, &v.addr);
    if let Some(o) = app.store.get(Kind::VipIndex, &key)? {
        return Err(conflict(
            "in_use",
            format!(
                "{} {} is already served by vip {}",
                v.proto,
                v.addr,
                String::from_utf8_lossy(&o)
            ),
        ));
    }
    let mut conds = vec![
        Cond::Equals(Kind::Vip, v.name.clone(), None),
        Cond::Equals(Kind::VipIndex, key.clone(), None),
    ];
    if let Some(net) = &v.network {
        let net_cur = app
            .store
            .get(Kind::Network, net)?
            .ok_or_else(|| bad(format!("network {net} does not exist")))?;
        let n: api::Network = decode(&net_cur)?;
        let subnet = crate::net::Subnet::parse(&n.subnet).map_err(|e| {
            Error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("corrupt record of network {net}: {e}"),
            )
        })?;
        rules::check_vip_on_network(addr, net, subnet, n.gateway.as_deref()).map_err(vip_bad)?;
        let ip = addr.ip().to_string();
        for (_, b) in app.store.list(Kind::Port)?.1 {
            let p: api::Port = decode(&b)?;
            if p.network == *net && p.ip == ip {
                return Err(conflict(
                    "in_use",
                    format!(
                        "vip address {ip} is already used by port {} in network {net}",
                        p.name
                    ),
                ));
            }
        }
        conds.push(Cond::Equals(Kind::Network, net.clone(), Some(net_cur)));
    }
    let rev = app.store.commit(
        &conds,
        &[
            Op::Put(Kind::Vip, v.name.clone(), encode(&v)),
            Op::Put(Kind::VipIndex, key, v.name.clone().into_bytes()),
        ],
    )?;
    app.vips.rev.send_replace(rev);
    // Reports that raced a delete of an earlier VIP of this name are not this one's.
    app.vips.reports.lock().unwrap().remove(&v.name);
    tracing::info!(vip = %v.name, addr = %v.addr, proto = %v.proto, network = ?v.network, algo = %v.algo, "vip created");
    Ok((StatusCode::CREATED, Json(v)))
}

fn vips(app: &App) -> ApiResult<(u64, Vec<api::Vip>)> {
    let mut leases: HashMap<String, api::VipLease> = HashMap::new();
    for (name, b) in app.store.list(Kind::VipLease)?.1 {
        leases.insert(name, decode(&b)?);
    }
    let (revision, items) = app.store.list(Kind::Vip)?;
    let items = items
        .iter()
        .map(|(_, b)| {
            decode(b).map(|mut v: api::Vip| {
                v.lease = leases.remove(&v.name);
                with_fresh_reports(app, v)
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok((revision, items))
}

/// `GET /v1/vips[?after_revision=N&timeout_ms=T]`: every VIP with its fresh reports. With
/// `after_revision`, waits until a VIP or backend change is past N (or `timeout_ms`, default
/// 30 s, at most 60 s; or shutdown). Reports do not wake it.
#[utoipa::path(get, path = "/v1/vips", tag = "vips", params(("after_revision" = Option<u64>, Query, description = "Long-poll: answer once the revision is past this"), ("timeout_ms" = Option<u64>, Query, description = "Long-poll limit, default 30000, at most 60000")), responses((status = 200, body = api::List<api::Vip>)))]
pub(super) async fn list_vips(
    State(app): State<AppState>,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> ApiResult<Json<api::List<api::Vip>>> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    if let Some(after) = q.after_revision {
        let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(60_000));
        let mut rx = app.vips.rev.subscribe();
        let mut stop = app.stopping.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(timeout, rx.wait_for(|r| *r > after)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
    let (revision, items) = vips(&app)?;
    Ok(Json(api::List { revision, items }))
}

#[utoipa::path(get, path = "/v1/vips/{name}", tag = "vips", params(("name" = String, Path, description = "VIP name")), responses((status = 200, body = api::Vip), (status = 404, body = api::ApiError, description = "not_found")))]
pub(super) async fn get_vip(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<Json<api::Vip>> {
    let (_, v) = load(&app, &name)?;
    Ok(Json(with_reports(&app, v)))
}

#[utoipa::path(delete, path = "/v1/vips/{name}", tag = "vips", params(("name" = String, Path, description = "VIP name")), responses((status = 204, description = "Deleted (with its port, if any)"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
pub(super) async fn delete_vip(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<StatusCode> {
    let _g = app.mutate.lock().await;
    let (cur, v) = load(&app, &name)?;
    let mut ops = vec![
        Op::Delete(Kind::Vip, name.clone()),
        Op::Delete(Kind::VipLease, name.clone()),
    ];
    let key = addr_key(v.proto, &v.addr);
    if app.store.get(Kind::VipIndex, &key)?.as_deref() == Some(name.as_bytes()) {
        ops.push(Op::Delete(Kind::VipIndex, key));
    }
    let mut conds = vec![Cond::Equals(Kind::Vip, name.clone(), Some(cur))];
    // Its overlay port (`CreatePort::vip`) goes in the same commit.
    let port = super::network::vip_port_delete(&app, &name, &mut conds, &mut ops)?;
    let rev = app.store.commit(&conds, &ops)?;
    app.vips.rev.send_replace(rev);
    if port.is_some() {
        app.net_rev.send_replace(rev);
    }
    app.vips.reports.lock().unwrap().remove(&name);
    tracing::info!(vip = %name, addr = %v.addr, proto = %v.proto, port = ?port, "vip deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn state_name(s: api::BackendState) -> &'static str {
    match s {
        api::BackendState::Active => "active",
        api::BackendState::Draining => "draining",
    }
}

/// `POST /v1/vips/{name}/backends`: 201 with the VIP; 409 `already_exists` if the VIP has the
/// backend (whatever its state).
#[utoipa::path(post, path = "/v1/vips/{name}/backends", tag = "vips", params(("name" = String, Path, description = "VIP name")), request_body = api::AddBackend, responses((status = 201, body = api::Vip, description = "Added"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "already_exists or conflict")))]
pub(super) async fn add_backend(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::AddBackend>,
) -> ApiResult<(StatusCode, Json<api::Vip>)> {
    let b = rules::check_backend(&req).map_err(vip_bad)?;
    let addr: SocketAddr = b
        .addr
        .parse()
        .map_err(|_| bad(format!("backend {:?} is not an IP:PORT address", b.addr)))?;
    let _g = app.mutate.lock().await;
    let (cur, mut v) = load(&app, &name)?;
    if let Some(i) = rules::find_backend(&v, addr) {
        return Err(conflict(
            "already_exists",
            format!(
                "backend {} is already in vip {name} ({})",
                b.addr,
                state_name(v.backends[i].state)
            ),
        ));
    }
    rules::check_backend_room(&v).map_err(vip_bad)?;
    v.backends.push(b.clone());
    store_vip(&app, cur, &v)?;
    tracing::info!(vip = %name, backend = %b.addr, weight = b.weight, max_conns = ?b.max_conns, "backend added");
    Ok((StatusCode::CREATED, Json(with_reports(&app, v))))
}

/// The backend address in a path, checked like a body's.
fn path_backend(addr: &str) -> ApiResult<SocketAddr> {
    rules::parse_addr("backend", addr).map_err(vip_bad)
}

fn backend_not_found(addr: SocketAddr, vip: &str) -> Error {
    not_found(format!("backend {addr} is not in vip {vip}"))
}

/// `DELETE /v1/vips/{name}/backends/{addr}`: 200 with the VIP. The instances close the
/// backend's established connections `drain_secs` after they see it gone.
#[utoipa::path(delete, path = "/v1/vips/{name}/backends/{addr}", tag = "vips", params(("name" = String, Path, description = "VIP name"), ("addr" = String, Path, description = "Backend IP:PORT")), responses((status = 200, body = api::Vip), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
pub(super) async fn remove_backend(
    State(app): State<AppState>,
    Name2(name, addr): Name2,
) -> ApiResult<Json<api::Vip>> {
    let addr = path_backend(&addr)?;
    let _g = app.mutate.lock().await;
    let (cur, mut v) = load(&app, &name)?;
    let i = rules::find_backend(&v, addr).ok_or_else(|| backend_not_found(addr, &name))?;
    let b = v.backends.remove(i);
    store_vip(&app, cur, &v)?;
    tracing::info!(vip = %name, backend = %b.addr, "backend removed");
    Ok(Json(with_reports(&app, v)))
}

/// `POST /v1/vips/{name}/backends/{addr}/drain`: 200 with the VIP; a backend already draining
/// keeps its start time (no write, no watch woken).
#[utoipa::path(post, path = "/v1/vips/{name}/backends/{addr}/drain", tag = "vips", params(("name" = String, Path, description = "VIP name"), ("addr" = String, Path, description = "Backend IP:PORT")), responses((status = 200, body = api::Vip), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
pub(super) async fn drain_backend(
    State(app): State<AppState>,
    Name2(name, addr): Name2,
) -> ApiResult<Json<api::Vip>> {
    let addr = path_backend(&addr)?;
    let _g = app.mutate.lock().await;
    let (cur, mut v) = load(&app, &name)?;
    let i = rules::find_backend(&v, addr).ok_or_else(|| backend_not_found(addr, &name))?;
    if rules::drain(&mut v, i, now_ms()) {
        store_vip(&app, cur, &v)?;
        tracing::info!(vip = %name, backend = %addr, drain_secs = v.drain_secs, "backend draining");
    }
    Ok(Json(with_reports(&app, v)))
}

/// `PUT /v1/vips/{name}/status/{node}`: memory only; 404 for an unknown VIP (so an instance
/// learns it was deleted).
#[utoipa::path(put, path = "/v1/vips/{name}/status/{node}", tag = "vips", params(("name" = String, Path, description = "VIP name"), ("node" = String, Path, description = "Node of the reporting lb-vip")), request_body = api::VipReport, responses((status = 204, description = "Recorded"), (status = 404, body = api::ApiError, description = "not_found")))]
pub(super) async fn report(
    State(app): State<AppState>,
    Name2(name, node): Name2,
    Body(r): Body<api::VipReport>,
) -> ApiResult<StatusCode> {
    validate_node_name(&node)?;
    if app.store.get(Kind::Vip, &name)?.is_none() {
        return Err(vip_not_found(&name));
    }
    let now = now_ms();
    let max_age = app.cfg.down_after.as_millis() as u64;
    let mut reports = app.vips.reports.lock().unwrap();
    let of_vip = reports.entry(name).or_default();
    of_vip.retain(|_, (t, _)| now.saturating_sub(*t) < max_age);
    of_vip.insert(node, (now, r));
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/vips/{name}/lease` `{node, ttl_ms}`: 200 with the lease when nobody holds it, the
/// holder's lease expired (by this manager's clock) or `node` is the holder (a renewal keeps
/// the epoch, a new tenure bumps it); 409 `held` naming the holder and its expiry, or 409
/// `lease_lost` for a renewal (`epoch` given) of an epoch `node` no longer holds; 404 for an
/// unknown VIP; 400 for a bad node name or a ttl outside 500..=60000 ms. Stored durably under
/// compare-and-swap on the lease and the VIP record. Only a new tenure wakes VIP watches
/// (renewals do not).
#[utoipa::path(post, path = "/v1/vips/{name}/lease", tag = "vips", operation_id = "acquire_vip_lease", params(("name" = String, Path, description = "VIP name")), request_body = api::VipLeaseRequest, responses((status = 200, body = api::VipLease), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "held (another node holds it), lease_lost or conflict")))]
pub(super) async fn acquire_lease(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::VipLeaseRequest>,
) -> ApiResult<Json<api::VipLease>> {
    validate_node_name(&req.node)?;
    rules::check_lease_ttl(req.ttl_ms).map_err(vip_bad)?;
    let _g = app.mutate.lock().await;
    let vip_cur = app
        .store
        .get(Kind::Vip, &name)?
        .ok_or_else(|| vip_not_found(&name))?;
    let cur = app.store.get(Kind::VipLease, &name)?;
    let old: Option<api::VipLease> = cur.as_deref().map(decode).transpose()?;
    let now = now_ms();
    let g = rules::acquire_lease(&name, old.as_ref(), &req.node, req.epoch, req.ttl_ms, now)
        .map_err(|r| {
            let (code, msg) = rules::refusal_message(&name, &req.node, &r, now);
            conflict(code, msg)
        })?;
    let rev = app.store.commit(
        &[
            Cond::Equals(Kind::Vip, name.clone(), Some(vip_cur)),
            Cond::Equals(Kind::VipLease, name.clone(), cur),
        ],
        &[Op::Put(Kind::VipLease, name.clone(), encode(&g.lease))],
    )?;
    if g.new_holder {
        app.vips.rev.send_replace(rev);
        tracing::info!(vip = %name, holder = %g.lease.holder, epoch = g.lease.epoch, previous = ?old.map(|l| l.holder), "vip lease granted");
    }
    Ok(Json(g.lease))
}

/// `?node=N` of a lease release.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeQuery {
    node: String,
}

/// `DELETE /v1/vips/{name}/lease?node=N`: 204 when `node` held the lease (it ends now, the
/// epoch stays) or nobody holds it; 409 `held` when another node does; 404 for an unknown VIP.
#[utoipa::path(delete, path = "/v1/vips/{name}/lease", tag = "vips", operation_id = "release_vip_lease", params(("name" = String, Path, description = "VIP name"), ("node" = String, Query, description = "The releasing node")), responses((status = 204, description = "Released (or nobody held it)"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "held: another node holds it")))]
pub(super) async fn release_lease(
    State(app): State<AppState>,
    Name(name): Name,
    q: Result<Query<NodeQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    validate_node_name(&q.node)?;
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Vip, &name)?.is_none() {
        return Err(vip_not_found(&name));
    }
    let cur = app.store.get(Kind::VipLease, &name)?;
    let old: Option<api::VipLease> = cur.as_deref().map(decode).transpose()?;
    let now = now_ms();
    let released = rules::release_lease(old.as_ref(), &q.node, now)
        .map_err(|l| conflict("held", rules::held_message(&l, now)))?;
    if let Some(l) = released {
        let rev = app.store.commit(
            &[Cond::Equals(Kind::VipLease, name.clone(), cur)],
            &[Op::Put(Kind::VipLease, name.clone(), encode(&l))],
        )?;
        app.vips.rev.send_replace(rev);
        tracing::info!(vip = %name, holder = %l.holder, epoch = l.epoch, "vip lease released");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// VIP gauges for `/metrics` (see `crate::metrics::render_vips`).
pub(super) fn render_metrics(app: &App, out: &mut String) {
    if let Ok((_, vs)) = vips(app) {
        crate::metrics::render_vips(out, &vs);
    }
}
