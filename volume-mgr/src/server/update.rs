//! Updates of resources that have no other way to change: `PATCH /v1/volumes/{name}`,
//! `PATCH /v1/networks/{name}`, and `GET /v1/switches/{name}`. Each update is a
//! compare-and-swap on the record it read (409 `conflict` when another change landed first).

use super::{bad, decode, encode, not_found, ApiResult, AppState, Body, Name};
use crate::api;
use crate::net;
use crate::store::{Cond, Kind, Op};
use axum::extract::State;
use axum::Json;

#[utoipa::path(patch, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = api::UpdateVolume,
    responses((status = 200, body = api::Volume, description = "Updated"),
        (status = 404, body = api::ApiError, description = "not_found"),
        (status = 409, body = api::ApiError, description = "conflict: a concurrent change; retry")))]
pub(crate) async fn update_volume(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::UpdateVolume>,
) -> ApiResult<Json<api::Volume>> {
    if req.size.is_some() {
        return Err(bad(
            "size cannot change: create a new volume and copy (fabctl volume export/import)",
        ));
    }
    if req.replicas.is_some() {
        return Err(bad(
            "replicas cannot change: create a new volume with --replicas and copy",
        ));
    }
    let _g = app.mutate.lock().await;
    let cur = app
        .store
        .get(Kind::Volume, &name)?
        .ok_or_else(|| not_found(format!("volume {name} not found")))?;
    let mut v: api::Volume = decode(&cur)?;
    if let Some(m) = req.min_replicas {
        if !(1..=v.replicas).contains(&m) {
            return Err(bad(format!(
                "min_replicas must be 1 to replicas ({}), got {m}",
                v.replicas
            )));
        }
        v.min_replicas = m;
    }
    let rev = app.store.commit(
        &[Cond::Equals(Kind::Volume, name.clone(), Some(cur))],
        &[Op::Put(Kind::Volume, name.clone(), encode(&v))],
    )?;
    app.volume_rev.send_replace(rev);
    tracing::info!(volume = %name, min_replicas = v.min_replicas, "volume updated");
    Ok(Json(v))
}

#[utoipa::path(patch, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    request_body = api::UpdateNetwork,
    responses((status = 200, body = api::Network, description = "Updated"),
        (status = 404, body = api::ApiError, description = "not_found"),
        (status = 409, body = api::ApiError, description = "in_use: a port has the new gateway address; conflict: a concurrent change")))]
pub(crate) async fn update_network(
    State(app): State<AppState>,
    Name(name): Name,
    Body(req): Body<api::UpdateNetwork>,
) -> ApiResult<Json<api::Network>> {
    if req.vni.is_some() {
        return Err(bad(
            "vni cannot change: ports and vswitches use it; create a new network",
        ));
    }
    if req.subnet.is_some() {
        return Err(bad(
            "subnet cannot change: the ports' addresses are in it; create a new network",
        ));
    }
    let _g = app.mutate.lock().await;
    let cur = app
        .store
        .get(Kind::Network, &name)?
        .ok_or_else(|| not_found(format!("network {name} not found")))?;
    let mut n: api::Network = decode(&cur)?;
    // The same checks as a create, on the record with the changes applied.
    let mut check = api::CreateNetwork {
        name: n.name.clone(),
        vni: n.vni,
        subnet: n.subnet.clone(),
        mtu: n.mtu,
        gateway: n.gateway.clone(),
        dns: n.dns.clone(),
    };
    if let Some(m) = req.mtu {
        check.mtu = (m != 0).then_some(m);
    }
    if let Some(g) = &req.gateway {
        check.gateway = (!g.is_empty()).then(|| g.clone());
    }
    if let Some(d) = &req.dns {
        check.dns = d.clone();
    }
    let checked = net::check_network(&check, n.created_ms).map_err(|e| bad(e.to_string()))?;
    let mut conds = vec![Cond::Equals(Kind::Network, name.clone(), Some(cur))];
    if checked.gateway != n.gateway {
        if let Some(g) = &checked.gateway {
            // No port may hold the new router address (the ip index names its owner).
            let k = format!("ip/{name}/{g}");
            if let Some(owner) = app.store.get(Kind::NetIndex, &k)? {
                return Err(super::Error(
                    axum::http::StatusCode::CONFLICT,
                    "in_use",
                    format!(
                        "gateway {g} is port {}'s address",
                        String::from_utf8_lossy(&owner)
                    ),
                ));
            }
            conds.push(Cond::Equals(Kind::NetIndex, k, None));
        }
    }
    n.mtu = checked.mtu;
    n.gateway = checked.gateway;
    n.dns = checked.dns;
    let rev = app
        .store
        .commit(&conds, &[Op::Put(Kind::Network, name.clone(), encode(&n))])?;
    app.net_rev.send_replace(rev);
    tracing::info!(network = %name, mtu = ?n.mtu, gateway = ?n.gateway, "network updated");
    Ok(Json(n))
}

#[utoipa::path(get, path = "/v1/switches/{name}", tag = "switches",
    params(("name" = String, Path, description = "Node name of the vswitch")),
    responses((status = 200, body = api::Switch), (status = 404, body = api::ApiError, description = "not_found")))]
pub(crate) async fn get_switch(
    State(app): State<AppState>,
    Name(name): Name,
) -> ApiResult<Json<api::Switch>> {
    let b = app
        .store
        .get(Kind::Switch, &name)?
        .ok_or_else(|| not_found(format!("no vswitch registered on {name}")))?;
    let mut s: api::Switch = decode(&b)?;
    if let Some(l) = app.switch_live.lock().unwrap().get(&name) {
        s.last_heartbeat_ms = s.last_heartbeat_ms.max(l.last_heartbeat_ms);
    }
    Ok(Json(s))
}
