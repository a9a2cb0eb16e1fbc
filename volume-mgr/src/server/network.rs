//! Overlay networks, their ports and the vswitches that serve them (issue 4).
//!
//! Every write is one store commit whose conditions make it a compare-and-swap: a network's
//! VNI, a port's MAC and IP within its network, and an interface name on a node are claimed by
//! index keys (`Kind::NetIndex`) that must be absent, and a port bumps its network's port count
//! (which a network delete requires unchanged), so even two managers over one store could never
//! hand out the same VNI, MAC or IP, or delete a network under a new port. (Within one manager
//! the writes are serialised as well.) The checks themselves are pure code in `crate::net`.
//!
//! Switch liveness: registration is stored; heartbeats (and the port counters they carry) live
//! in memory and cost no write. A switch is recorded down when it has not beaten for
//! `down_after`, and up again on its next heartbeat, by [`switch_liveness`]: only those
//! transitions are commits, so they wake netstate watches and a heartbeat that changes nothing
//! does not. `GET /v1/netstate` is therefore a pure function of the store revision it carries.

use super::{
    bad, decode, encode, not_found, now_ms, validate_node_name, ApiResult, App, AppState, Body,
    Error, Name, WatchQuery,
};
use crate::api;
use crate::net::{self, Mac, Subnet};
use crate::store::{Cond, Kind, Op};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

/// What the manager keeps in memory about a vswitch.
pub(super) struct SwitchLive {
    pub last_heartbeat_ms: u64,
    /// Port counters of its last heartbeat, by port name.
    pub ports: BTreeMap<String, api::PortStats>,
}

/// Index keys (in `Kind::NetIndex`). Network and node names never hold `/`.
mod key {
    pub fn vni(vni: u32) -> String {
        format!("vni/{vni}")
    }
    pub fn mac(network: &str, mac: &str) -> String {
        format!("mac/{network}/{mac}")
    }
    pub fn ip(network: &str, ip: &str) -> String {
        format!("ip/{network}/{ip}")
    }
    pub fn ifname(node: &str, ifname: &str) -> String {
        format!("ifname/{node}/{ifname}")
    }
    pub fn port_count(network: &str) -> String {
        format!("ports/{network}")
    }
    /// The port of a VIP (`CreatePort::vip`).
    pub fn vip_port(vip: &str) -> String {
        format!("vipport/{vip}")
    }
}

fn net_bad(e: net::NetError) -> Error {
    bad(e.to_string())
}
fn in_use(msg: String) -> Error {
    Error(StatusCode::CONFLICT, "in_use", msg)
}
fn already_exists(msg: String) -> Error {
    Error(StatusCode::CONFLICT, "already_exists", msg)
}
fn internal(msg: String) -> Error {
    Error(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
}

/// `a, b, c` or `a, b, c and 7 more`.
fn name_list<S: AsRef<str>>(names: &[S], max: usize) -> String {
    let shown: Vec<&str> = names.iter().take(max).map(|s| s.as_ref()).collect();
    if names.len() > max {
        format!("{} and {} more", shown.join(", "), names.len() - max)
    } else {
        shown.join(", ")
    }
}

fn owner(app: &App, key: &str) -> ApiResult<Option<String>> {
    Ok(app
        .store
        .get(Kind::NetIndex, key)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn stored_subnet(n: &api::Network) -> ApiResult<Subnet> {
    Subnet::parse(&n.subnet)
        .map_err(|e| internal(format!("corrupt record of network {}: {e}", n.name)))
}

// ---- networks ------------------------------------------------------------------------------

#[utoipa::path(post, path = "/v1/networks", tag = "networks", request_body = api::CreateNetwork, responses((status = 201, body = api::Network, description = "Created"), (status = 409, body = api::ApiError, description = "already_exists, in_use (the VNI) or conflict")))]
pub(super) async fn create_network(
    State(app): State<AppState>,
    Body(req): Body<api::CreateNetwork>,
) -> ApiResult<(StatusCode, Json<api::Network>)> {
    let n = net::check_network(&req, now_ms()).map_err(net_bad)?;
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Network, &n.name)?.is_some() {
        return Err(already_exists(format!("network {} already exists", n.name)));
    }
    let vni = key::vni(n.vni);
    if let Some(o) = owner(&app, &vni)? {
        return Err(in_use(format!(
            "vni {} is already used by network {o}",
            n.vni
        )));
    }
    let rev = app.store.commit(
        &[
            Cond::Equals(Kind::Network, n.name.clone(), None),
            Cond::Equals(Kind::NetIndex, vni.clone(), None),
        ],
        &[
            Op::Put(Kind::Network, n.name.clone(), encode(&n)),
            Op::Put(Kind::NetIndex, vni, n.name.clone().into_bytes()),
        ],
    )?;
    app.net_rev.send_replace(rev);
    tracing::info!(network = %n.name, vni = n.vni, subnet = %n.subnet, "network created");
    Ok((StatusCode::CREATED, Json(n)))
}

#[utoipa::path(get, path = "/v1/networks", tag = "networks", responses((status = 200, body = api::List<api::Network>)))]
pub(super) async fn list_networks(
    State(app): State<AppState>,
) -> ApiResult<Json<api::List<api::Network>>> {
    let (revision, items) = app.store.list(Kind::Network)?;
    let items = items
        .iter()
        .map(|(_, b)| decode(b))
        .collect::<ApiResult<Vec<api::Network>>>()?;
    Ok(Json(api::List { revision, items }))
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path, description = "Network name")), responses((status = 200, body = api::Network), (status = 404, body = api::ApiError, description = "not_found")))]
pub(super) async fn get_network(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<Json<api::Network>> {
    let b = app
        .store
        .get(Kind::Network, &name)?
        .ok_or_else(|| not_found(format!("network {name} not found")))?;
    Ok(Json(decode(&b)?))
}

/// The VIPs on network `name`, with their IPv4 addresses (a VIP's address is never a port's).
fn vips_on(app: &App, name: &str) -> ApiResult<Vec<(String, Option<Ipv4Addr>)>> {
    let mut out = Vec::new();
    for (_, b) in app.store.list(Kind::Vip)?.1 {
        let v: api::Vip = decode(&b)?;
        if v.network.as_deref() == Some(name) {
            let ip = v
                .addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .and_then(|a| match a.ip() {
                    std::net::IpAddr::V4(ip) => Some(ip),
                    std::net::IpAddr::V6(_) => None,
                });
            out.push((v.name, ip));
        }
    }
    Ok(out)
}

/// Refused (409 `in_use`, naming them) while the network has ports or VIPs.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path, description = "Network name")), responses((status = 204, description = "Deleted"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "in_use (the network has ports or VIPs) or conflict")))]
pub(super) async fn delete_network(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<StatusCode> {
    let _g = app.mutate.lock().await;
    let cur = app
        .store
        .get(Kind::Network, &name)?
        .ok_or_else(|| not_found(format!("network {name} not found")))?;
    let n: api::Network = decode(&cur)?;
    let ports: Vec<String> = ports(&app)?
        .into_iter()
        .filter(|p| p.network == name)
        .map(|p| p.name)
        .collect();
    if !ports.is_empty() {
        return Err(in_use(format!(
            "network {name} has {} {}: {}; delete them first",
            ports.len(),
            if ports.len() == 1 { "port" } else { "ports" },
            name_list(&ports, 10)
        )));
    }
    let vips: Vec<String> = vips_on(&app, &name)?.into_iter().map(|(v, _)| v).collect();
    if !vips.is_empty() {
        return Err(in_use(format!(
            "network {name} has {} {}: {}; delete them first",
            vips.len(),
            if vips.len() == 1 { "vip" } else { "vips" },
            name_list(&vips, 10)
        )));
    }
    let count = key::port_count(&name);
    let count_cur = app.store.get(Kind::NetIndex, &count)?;
    let vni = key::vni(n.vni);
    let mut ops = vec![
        Op::Delete(Kind::Network, name.clone()),
        Op::Delete(Kind::NetIndex, count.clone()),
    ];
    if owner(&app, &vni)?.as_deref() == Some(name.as_str()) {
        ops.push(Op::Delete(Kind::NetIndex, vni));
    }
    let rev = app.store.commit(
        &[
            Cond::Equals(Kind::Network, name.clone(), Some(cur)),
            Cond::Equals(Kind::NetIndex, count, count_cur),
        ],
        &ops,
    )?;
    app.net_rev.send_replace(rev);
    tracing::info!(network = %name, vni = n.vni, "network deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- ports ---------------------------------------------------------------------------------

fn ports(app: &App) -> ApiResult<Vec<api::Port>> {
    app.store
        .list(Kind::Port)?
        .1
        .iter()
        .map(|(_, b)| decode(b))
        .collect()
}

/// The port with the counters its switch last reported (if any).
fn with_stats(app: &App, mut p: api::Port) -> api::Port {
    p.stats = app
        .switch_live
        .lock()
        .unwrap()
        .get(&p.node)
        .and_then(|l| l.ports.get(&p.name))
        .cloned();
    p
}

/// A port's node must be a registered vswitch or blockd node.
fn check_node_known(app: &App, node: &str) -> ApiResult<()> {
    if app.store.get(Kind::Switch, node)?.is_some() || app.store.get(Kind::Node, node)?.is_some() {
        return Ok(());
    }
    let known: BTreeSet<String> = app
        .store
        .list(Kind::Switch)?
        .1
        .into_iter()
        .chain(app.store.list(Kind::Node)?.1)
        .map(|(k, _)| k)
        .collect();
    let known: Vec<String> = known.into_iter().collect();
    Err(bad(if known.is_empty() {
        format!("node {node} is not a registered vswitch or blockd node (none is registered yet)")
    } else {
        format!(
            "node {node} is not a registered vswitch or blockd node; known: {}",
            name_list(&known, 10)
        )
    }))
}

#[utoipa::path(post, path = "/v1/ports", tag = "ports", request_body = api::CreatePort, responses((status = 201, body = api::Port, description = "Created"), (status = 409, body = api::ApiError, description = "already_exists, in_use (MAC, IP, interface name, VIP) or conflict"), (status = 507, body = api::ApiError, description = "no_capacity: the subnet has no free address")))]
pub(super) async fn create_port(
    State(app): State<AppState>,
    Body(req): Body<api::CreatePort>,
) -> ApiResult<(StatusCode, Json<api::Port>)> {
    let chk = net::check_port(&req).map_err(net_bad)?;
    validate_node_name(&req.node)?;
    let _g = app.mutate.lock().await;
    if app.store.get(Kind::Port, &req.name)?.is_some() {
        return Err(already_exists(format!("port {} already exists", req.name)));
    }
    let net_cur = app
        .store
        .get(Kind::Network, &req.network)?
        .ok_or_else(|| bad(format!("network {} does not exist", req.network)))?;
    let network: api::Network = decode(&net_cur)?;
    let subnet = stored_subnet(&network)?;
    check_node_known(&app, &req.node)?;
    if let Some(ip) = chk.ip {
        net::check_port_ip(ip, subnet).map_err(net_bad)?;
    }
    let ifname_key = key::ifname(&req.node, &chk.ifname);
    if let Some(o) = owner(&app, &ifname_key)? {
        return Err(in_use(format!(
            "interface {} on node {} is already used by port {o}",
            chk.ifname, req.node
        )));
    }
    let peers: Vec<api::Port> = ports(&app)?
        .into_iter()
        .filter(|p| p.network == req.network)
        .collect();
    let mac = match chk.mac {
        Some(m) => {
            if let Some(o) = peers.iter().find(|p| Mac::parse(&p.mac) == Ok(m)) {
                return Err(in_use(format!(
                    "mac {m} is already used by port {} in network {}",
                    o.name, req.network
                )));
            }
            m
        }
        None => {
            let taken: HashSet<Mac> = peers
                .iter()
                .filter_map(|p| Mac::parse(&p.mac).ok())
                .collect();
            net::allocate_mac(&req.network, &req.name, |m| taken.contains(m))
                .ok_or_else(|| internal("no free MAC address after 65536 probes".into()))?
        }
    };
    let vip_ips = vips_on(&app, &req.network)?;
    // A VIP's port: the VIP exists on this network, has no port yet, and lends its address.
    let mut vip_conds = Vec::new();
    let chk_ip = match &req.vip {
        None => chk.ip,
        Some(v) => {
            let vcur = app
                .store
                .get(Kind::Vip, v)?
                .ok_or_else(|| bad(format!("vip {v} does not exist")))?;
            let vr: api::Vip = decode(&vcur)?;
            if vr.network.as_deref() != Some(req.network.as_str()) {
                return Err(bad(format!(
                    "vip {v} is not on network {} ({})",
                    req.network,
                    match &vr.network {
                        Some(n) => format!("it is on network {n}"),
                        None => "it is on no overlay network".into(),
                    }
                )));
            }
            let Some(Some(vip_ip)) = vip_ips.iter().find(|(n, _)| n == v).map(|(_, a)| *a) else {
                return Err(bad(format!(
                    "vip {v} has no IPv4 address ({}); only IPv4 VIPs get a port",
                    vr.addr
                )));
            };
            if chk.ip.is_some_and(|ip| ip != vip_ip) {
                return Err(bad(format!(
                    "the port of vip {v} must have the vip's address {vip_ip}, not {}",
                    chk.ip.map(|i| i.to_string()).unwrap_or_default()
                )));
            }
            let k = key::vip_port(v);
            if let Some(o) = owner(&app, &k)? {
                return Err(in_use(format!("vip {v} already has port {o}")));
            }
            vip_conds.push(Cond::Equals(Kind::Vip, v.clone(), Some(vcur)));
            vip_conds.push(Cond::Equals(Kind::NetIndex, k, None));
            Some(vip_ip)
        }
    };
    let ip = match chk_ip {
        Some(ip) => {
            if let Some((v, _)) = vip_ips
                .iter()
                .find(|(n, a)| *a == Some(ip) && req.vip.as_deref() != Some(n.as_str()))
            {
                return Err(in_use(format!(
                    "ip {ip} is the address of vip {v} in network {}",
                    req.network
                )));
            }
            if let Some(o) = peers.iter().find(|p| p.ip.parse() == Ok(ip)) {
                return Err(in_use(format!(
                    "ip {ip} is already used by port {} in network {}",
                    o.name, req.network
                )));
            }
            ip
        }
        None => {
            let taken: HashSet<Ipv4Addr> = peers
                .iter()
                .filter_map(|p| p.ip.parse().ok())
                .chain(vip_ips.iter().filter_map(|(_, a)| *a))
                .collect();
            let gateway: Option<Ipv4Addr> = network.gateway.as_deref().and_then(|g| g.parse().ok());
            net::allocate_ip(subnet, gateway, &taken).ok_or_else(|| {
                Error(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "no_capacity",
                    format!(
                        "no free address in subnet {subnet} of network {}: its {} ports{} and the DHCP server address hold all of them",
                        req.network,
                        peers.len(),
                        if gateway.is_some() { ", the gateway" } else { "" }
                    ),
                )
            })?
        }
    };
    let port = api::Port {
        name: req.name.clone(),
        network: req.network.clone(),
        node: req.node.clone(),
        kind: req.kind,
        mac: mac.to_string(),
        ip: ip.to_string(),
        netns: req.netns.clone(),
        ifname: chk.ifname.clone(),
        created_ms: now_ms(),
        vip: req.vip.clone(),
        stats: None,
    };
    let count = key::port_count(&req.network);
    let count_cur = app.store.get(Kind::NetIndex, &count)?;
    let n: u64 = count_cur.as_deref().map(decode).transpose()?.unwrap_or(0);
    let mac_key = key::mac(&req.network, &port.mac);
    let ip_key = key::ip(&req.network, &port.ip);
    let owner_v = || port.name.clone().into_bytes();
    let mut conds = vec![
        Cond::Equals(Kind::Port, port.name.clone(), None),
        Cond::Equals(Kind::Network, req.network.clone(), Some(net_cur)),
        Cond::Equals(Kind::NetIndex, count.clone(), count_cur),
        Cond::Equals(Kind::NetIndex, mac_key.clone(), None),
        Cond::Equals(Kind::NetIndex, ip_key.clone(), None),
        Cond::Equals(Kind::NetIndex, ifname_key.clone(), None),
    ];
    conds.extend(vip_conds);
    let mut ops = vec![
        Op::Put(Kind::Port, port.name.clone(), encode(&port)),
        Op::Put(Kind::NetIndex, count, encode(&(n + 1))),
        Op::Put(Kind::NetIndex, mac_key, owner_v()),
        Op::Put(Kind::NetIndex, ip_key, owner_v()),
        Op::Put(Kind::NetIndex, ifname_key, owner_v()),
    ];
    if let Some(v) = &port.vip {
        ops.push(Op::Put(Kind::NetIndex, key::vip_port(v), owner_v()));
    }
    let rev = app.store.commit(&conds, &ops)?;
    app.net_rev.send_replace(rev);
    tracing::info!(port = %port.name, network = %port.network, node = %port.node, kind = ?port.kind, mac = %port.mac, ip = %port.ip, vip = ?port.vip, "port created");
    Ok((StatusCode::CREATED, Json(port)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortQuery {
    network: Option<String>,
    node: Option<String>,
}

/// `GET /v1/ports[?network=NET][&node=NODE]`, with the last reported counters.
#[utoipa::path(get, path = "/v1/ports", tag = "ports", params(("network" = Option<String>, Query, description = "Only ports on this network"), ("node" = Option<String>, Query, description = "Only ports on this node")), responses((status = 200, body = api::List<api::Port>)))]
pub(super) async fn list_ports(
    State(app): State<AppState>,
    q: Result<Query<PortQuery>, QueryRejection>,
) -> ApiResult<Json<api::List<api::Port>>> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let (revision, items) = app.store.list(Kind::Port)?;
    let mut out = Vec::new();
    for (_, b) in items {
        let p: api::Port = decode(&b)?;
        if q.network.as_ref().is_some_and(|n| *n != p.network)
            || q.node.as_ref().is_some_and(|n| *n != p.node)
        {
            continue;
        }
        out.push(with_stats(&app, p));
    }
    Ok(Json(api::List {
        revision,
        items: out,
    }))
}

#[utoipa::path(get, path = "/v1/ports/{name}", tag = "ports", params(("name" = String, Path, description = "Port name")), responses((status = 200, body = api::Port), (status = 404, body = api::ApiError, description = "not_found")))]
pub(super) async fn get_port(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<Json<api::Port>> {
    let b = app
        .store
        .get(Kind::Port, &name)?
        .ok_or_else(|| not_found(format!("port {name} not found")))?;
    Ok(Json(with_stats(&app, decode(&b)?)))
}

/// The conditions and operations that delete port `name` (stored as `cur`) with the index
/// claims it holds.
fn port_delete_ops(
    app: &App,
    name: &str,
    cur: Vec<u8>,
    p: &api::Port,
    conds: &mut Vec<Cond>,
    ops: &mut Vec<Op>,
) -> ApiResult<()> {
    let count = key::port_count(&p.network);
    let count_cur = app.store.get(Kind::NetIndex, &count)?;
    let n: u64 = count_cur.as_deref().map(decode).transpose()?.unwrap_or(0);
    ops.push(Op::Delete(Kind::Port, name.to_string()));
    ops.push(if n <= 1 {
        Op::Delete(Kind::NetIndex, count.clone())
    } else {
        Op::Put(Kind::NetIndex, count.clone(), encode(&(n - 1)))
    });
    // Only the claims this port holds (never another port's).
    let mut claims = vec![
        key::mac(&p.network, &p.mac),
        key::ip(&p.network, &p.ip),
        key::ifname(&p.node, &p.ifname),
    ];
    if let Some(v) = &p.vip {
        claims.push(key::vip_port(v));
    }
    for k in claims {
        if owner(app, &k)?.as_deref() == Some(name) {
            ops.push(Op::Delete(Kind::NetIndex, k));
        }
    }
    conds.push(Cond::Equals(Kind::Port, name.to_string(), Some(cur)));
    conds.push(Cond::Equals(Kind::NetIndex, count, count_cur));
    Ok(())
}

#[utoipa::path(delete, path = "/v1/ports/{name}", tag = "ports", params(("name" = String, Path, description = "Port name")), responses((status = 204, description = "Deleted"), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
pub(super) async fn delete_port(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<StatusCode> {
    let _g = app.mutate.lock().await;
    let cur = app
        .store
        .get(Kind::Port, &name)?
        .ok_or_else(|| not_found(format!("port {name} not found")))?;
    let p: api::Port = decode(&cur)?;
    let (mut conds, mut ops) = (Vec::new(), Vec::new());
    port_delete_ops(&app, &name, cur, &p, &mut conds, &mut ops)?;
    let rev = app.store.commit(&conds, &ops)?;
    app.net_rev.send_replace(rev);
    tracing::info!(port = %name, network = %p.network, node = %p.node, "port deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// For `DELETE /v1/vips/{vip}` (under the write lock): adds to the VIP delete's commit the
/// deletion of the VIP's port, if it has one. Returns its name (the caller then bumps
/// `net_rev` after the commit).
pub(super) fn vip_port_delete(
    app: &App,
    vip: &str,
    conds: &mut Vec<Cond>,
    ops: &mut Vec<Op>,
) -> ApiResult<Option<String>> {
    let Some(name) = owner(app, &key::vip_port(vip))? else {
        return Ok(None);
    };
    let Some(cur) = app.store.get(Kind::Port, &name)? else {
        return Ok(None);
    };
    let p: api::Port = decode(&cur)?;
    if p.vip.as_deref() != Some(vip) {
        return Ok(None);
    }
    port_delete_ops(app, &name, cur, &p, conds, ops)?;
    Ok(Some(name))
}

/// `PUT /v1/ports/{name}/node`: the port moves to another node (its interface name must be
/// free there); MAC, IP, ifname and netns stay, so the old node's vswitch removes the
/// interface and the new one's creates it. Moving it to its own node changes nothing.
#[utoipa::path(put, path = "/v1/ports/{name}/node", tag = "ports", params(("name" = String, Path, description = "Port name")), request_body = api::MovePort, responses((status = 200, body = api::Port), (status = 404, body = api::ApiError, description = "not_found"), (status = 409, body = api::ApiError, description = "in_use (the interface name on the new node) or conflict")))]
pub(super) async fn move_port(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::MovePort>,
) -> ApiResult<Json<api::Port>> {
    validate_node_name(&req.node)?;
    let _g = app.mutate.lock().await;
    let cur = app
        .store
        .get(Kind::Port, &name)?
        .ok_or_else(|| not_found(format!("port {name} not found")))?;
    let mut p: api::Port = decode(&cur)?;
    if p.node == req.node {
        return Ok(Json(with_stats(&app, p)));
    }
    check_node_known(&app, &req.node)?;
    let new_key = key::ifname(&req.node, &p.ifname);
    if let Some(o) = owner(&app, &new_key)? {
        return Err(in_use(format!(
            "interface {} on node {} is already used by port {o}",
            p.ifname, req.node
        )));
    }
    let old_key = key::ifname(&p.node, &p.ifname);
    let mut ops = Vec::new();
    if owner(&app, &old_key)?.as_deref() == Some(name.as_str()) {
        ops.push(Op::Delete(Kind::NetIndex, old_key));
    }
    let from = std::mem::replace(&mut p.node, req.node.clone());
    ops.push(Op::Put(
        Kind::NetIndex,
        new_key.clone(),
        name.clone().into_bytes(),
    ));
    ops.push(Op::Put(Kind::Port, name.clone(), encode(&p)));
    let rev = app.store.commit(
        &[
            Cond::Equals(Kind::Port, name.clone(), Some(cur)),
            Cond::Equals(Kind::NetIndex, new_key, None),
        ],
        &ops,
    )?;
    app.net_rev.send_replace(rev);
    tracing::info!(port = %name, from = %from, to = %p.node, "port moved");
    Ok(Json(with_stats(&app, p)))
}

// ---- switches ------------------------------------------------------------------------------

/// A vswitch registers (or re-registers) its VTEP. A re-registration that changes nothing
/// (same address, port and MTU, recorded up) is not a write and wakes no watch.
#[utoipa::path(put, path = "/v1/switches/{name}", tag = "switches", params(("name" = String, Path, description = "Node name of the vswitch")), request_body = api::RegisterSwitch, responses((status = 200, body = api::Switch), (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
pub(super) async fn register_switch(
    State(app): State<AppState>,
    Name(node): Name,
    Body(req): Body<api::RegisterSwitch>,
) -> ApiResult<Json<api::Switch>> {
    validate_node_name(&node)?;
    let ip = net::check_register_switch(&req).map_err(net_bad)?;
    let _g = app.mutate.lock().await;
    let now = now_ms();
    let cur = app.store.get(Kind::Switch, &node)?;
    let old: Option<api::Switch> = cur.as_deref().map(decode).transpose()?;
    app.switch_live
        .lock()
        .unwrap()
        .entry(node.clone())
        .or_insert_with(|| SwitchLive {
            last_heartbeat_ms: now,
            ports: BTreeMap::new(),
        })
        .last_heartbeat_ms = now;
    let sw = api::Switch {
        node: node.clone(),
        underlay_ip: ip.to_string(),
        vxlan_port: req.vxlan_port,
        underlay_mtu: req.underlay_mtu,
        state: api::NodeState::Up,
        last_heartbeat_ms: now,
        registered_ms: old.as_ref().map(|o| o.registered_ms).unwrap_or(now),
    };
    if let Some(o) = &old {
        if o.underlay_ip == sw.underlay_ip
            && o.vxlan_port == sw.vxlan_port
            && o.underlay_mtu == sw.underlay_mtu
            && o.state == api::NodeState::Up
        {
            return Ok(Json(api::Switch {
                last_heartbeat_ms: now,
                ..o.clone()
            }));
        }
    }
    for (other, b) in app.store.list(Kind::Switch)?.1 {
        if other != node && decode::<api::Switch>(&b)?.underlay_ip == sw.underlay_ip {
            tracing::warn!(switch = %node, other = %other, underlay_ip = %sw.underlay_ip, "two switches registered with the same underlay address");
        }
    }
    let rev = app.store.commit(
        &[Cond::Equals(Kind::Switch, node.clone(), cur)],
        &[Op::Put(Kind::Switch, node.clone(), encode(&sw))],
    )?;
    app.net_rev.send_replace(rev);
    tracing::info!(switch = %node, underlay_ip = %sw.underlay_ip, vxlan_port = sw.vxlan_port, underlay_mtu = sw.underlay_mtu, "switch registered");
    Ok(Json(sw))
}

/// Liveness plus port counters, in memory only. A switch recorded down is recorded up by the
/// liveness task, woken here.
#[utoipa::path(put, path = "/v1/switches/{name}/heartbeat", tag = "switches", params(("name" = String, Path, description = "Node name of the vswitch")), request_body = api::SwitchHeartbeat, responses((status = 204, description = "Recorded"), (status = 404, body = api::ApiError, description = "not_found")))]
pub(super) async fn switch_heartbeat(
    State(app): State<AppState>,
    Name(node): Name,
    Body(hb): Body<api::SwitchHeartbeat>,
) -> ApiResult<StatusCode> {
    let b = app
        .store
        .get(Kind::Switch, &node)?
        .ok_or_else(|| not_found(format!("switch {node} is not registered")))?;
    let sw: api::Switch = decode(&b)?;
    app.switch_live.lock().unwrap().insert(
        node,
        SwitchLive {
            last_heartbeat_ms: now_ms(),
            ports: hb.ports,
        },
    );
    if sw.state != api::NodeState::Up {
        app.switch_wake.notify_one();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Registered switches with their recorded state and their last heartbeat.
#[utoipa::path(get, path = "/v1/switches", tag = "switches", responses((status = 200, body = api::List<api::Switch>)))]
pub(super) async fn list_switches(
    State(app): State<AppState>,
) -> ApiResult<Json<api::List<api::Switch>>> {
    let (revision, items) = app.store.list(Kind::Switch)?;
    let live = app.switch_live.lock().unwrap();
    let items = items
        .iter()
        .map(|(_, b)| {
            decode::<api::Switch>(b).map(|mut s| {
                if let Some(l) = live.get(&s.node) {
                    s.last_heartbeat_ms = s.last_heartbeat_ms.max(l.last_heartbeat_ms);
                }
                s
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(api::List { revision, items }))
}

/// Records switches that went down (no heartbeat for `down_after`) or came back up, in one
/// commit, which wakes netstate watches. Runs until shutdown: every `down_after / 10`
/// (20 ms to 1 s) and whenever a heartbeat comes from a switch recorded down.
pub(super) async fn switch_liveness(app: Arc<App>) {
    let tick = (app.cfg.down_after / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut stop = app.stopping.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = app.switch_wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // A controller: only the leader records switches up or down.
        if !app.leads() {
            continue;
        }
        if let Err(e) = record_switch_states(&app).await {
            tracing::warn!(error = %e.2, "cannot record switch states");
        }
    }
}

/// The switches whose recorded state is not what it should be now: (node, recorded bytes,
/// the record to write).
fn switch_changes(app: &App) -> ApiResult<Vec<(String, Vec<u8>, api::Switch)>> {
    let (_, items) = app.store.list(Kind::Switch)?;
    let now = now_ms();
    let live = app.switch_live.lock().unwrap();
    let mut out = Vec::new();
    for (node, b) in items {
        let mut sw: api::Switch = decode(&b)?;
        let hb = live.get(&node).map(|l| l.last_heartbeat_ms);
        let state = net::switch_state(sw.state, hb, app.started_ms, now, app.cfg.down_after);
        if state != sw.state {
            sw.state = state;
            if let Some(t) = hb {
                sw.last_heartbeat_ms = t;
            }
            out.push((node, b, sw));
        }
    }
    Ok(out)
}

async fn record_switch_states(app: &App) -> ApiResult<()> {
    // Most ticks change nothing: look before taking the write lock.
    if switch_changes(app)?.is_empty() {
        return Ok(());
    }
    let _g = app.mutate.lock().await;
    let changes = switch_changes(app)?;
    if changes.is_empty() {
        return Ok(());
    }
    let (mut conds, mut ops) = (Vec::new(), Vec::new());
    for (node, b, sw) in &changes {
        conds.push(Cond::Equals(Kind::Switch, node.clone(), Some(b.clone())));
        ops.push(Op::Put(Kind::Switch, node.clone(), encode(sw)));
    }
    let rev = app.store.commit(&conds, &ops)?;
    app.net_rev.send_replace(rev);
    for (node, _, sw) in changes {
        tracing::info!(switch = %node, state = ?sw.state, "switch state recorded");
    }
    Ok(())
}

// ---- netstate ------------------------------------------------------------------------------

/// `GET /v1/netstate[?after_revision=N&timeout_ms=T]`: networks, ports (without counters) and
/// switches (as recorded) at one store revision. With `after_revision`, waits until a change
/// to any of them is past N (or `timeout_ms`, default 30 s, at most 60 s; or shutdown).
#[utoipa::path(get, path = "/v1/netstate", tag = "switches", params(("after_revision" = Option<u64>, Query, description = "Long-poll: answer once the revision is past this"), ("timeout_ms" = Option<u64>, Query, description = "Long-poll limit, default 30000, at most 60000")), responses((status = 200, body = api::NetState)))]
pub(super) async fn net_state(
    State(app): State<AppState>,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> ApiResult<Json<api::NetState>> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    if let Some(after) = q.after_revision {
        let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(60_000));
        let mut rx = app.net_rev.subscribe();
        let mut stop = app.stopping.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(timeout, rx.wait_for(|r| *r > after)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
    for _ in 0..4 {
        if let Some(s) = read_net_state(&app)? {
            return Ok(Json(s));
        }
    }
    // Writes keep landing between the three reads: read while holding them off.
    let _g = app.mutate.lock().await;
    read_net_state(&app)?
        .map(Json)
        .ok_or_else(|| internal("store revision moved under the write lock".into()))
}

/// The three listings if they were read at the same revision.
fn read_net_state(app: &App) -> ApiResult<Option<api::NetState>> {
    let (r1, networks) = app.store.list(Kind::Network)?;
    let (r2, ports) = app.store.list(Kind::Port)?;
    let (r3, switches) = app.store.list(Kind::Switch)?;
    if r1 != r2 || r2 != r3 {
        return Ok(None);
    }
    Ok(Some(api::NetState {
        revision: r1,
        networks: networks
            .iter()
            .map(|(_, b)| decode(b))
            .collect::<ApiResult<_>>()?,
        ports: ports
            .iter()
            .map(|(_, b)| decode(b))
            .collect::<ApiResult<_>>()?,
        switches: switches
            .iter()
            .map(|(_, b)| decode(b))
            .collect::<ApiResult<_>>()?,
    }))
}

/// Gauges: networks, ports, switches by recorded state.
pub(super) fn render_metrics(app: &App, out: &mut String) {
    use std::fmt::Write;
    let count = |k| app.store.list(k).map(|(_, v)| v.len()).unwrap_or(0);
    let (mut up, mut down) = (0, 0);
    if let Ok((_, items)) = app.store.list(Kind::Switch) {
        for (_, b) in items {
            match decode::<api::Switch>(&b).map(|s| s.state) {
                Ok(api::NodeState::Up) => up += 1,
                Ok(api::NodeState::Down) => down += 1,
                Err(_) => {}
            }
        }
    }
    let _ = writeln!(out, "# HELP volume_mgr_networks Overlay networks.\n# TYPE volume_mgr_networks gauge\nvolume_mgr_networks {}", count(Kind::Network));
    let _ = writeln!(out, "# HELP volume_mgr_ports Ports of overlay networks.\n# TYPE volume_mgr_ports gauge\nvolume_mgr_ports {}", count(Kind::Port));
    let _ = writeln!(out, "# HELP volume_mgr_switches Registered vswitches by state.\n# TYPE volume_mgr_switches gauge\nvolume_mgr_switches{{state=\"up\"}} {up}\nvolume_mgr_switches{{state=\"down\"}} {down}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn name_lists_are_short() {
        assert_eq!(super::name_list::<&str>(&[], 3), "");
        assert_eq!(super::name_list(&["a", "b"], 3), "a, b");
        assert_eq!(
            super::name_list(&["a", "b", "c", "d", "e"], 3),
            "a, b, c and 2 more"
        );
    }
}
