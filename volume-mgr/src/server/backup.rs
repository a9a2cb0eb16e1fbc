//! Backup and restore of the whole cluster state (`GET /v1/backup`, `POST /v1/restore`,
//! `fabctl backup FILE` / `fabctl restore FILE`).
//!
//! A backup is every stored object read at one store revision. A restore writes them back,
//! with two changes that keep the data path safe when the restored state is older than what the
//! hosts have seen since:
//! - every volume lease epoch (and VIP lease epoch) moves up by [`EPOCH_GAP`]: replicas fence
//!   writers by epoch, and a manager that lost the state after the backup may have issued
//!   epochs above the backed-up ones; the next lease must be above all of them. VIP leases are
//!   restored expired, so the lb-vip instances elect a holder afresh.
//! - `next_volume_id` moves up by [`ID_GAP`]: volumes created after the backup left chunks on
//!   the hosts under their ids, which a new volume must never reuse.
//!
//! A restore into a cluster that has volumes, networks, ports or VIPs is refused (409
//! `not_empty`) unless `?force=true`, which also deletes every object not in the backup. The
//! objects are written in batches (etcd caps the operations of one transaction); a restore cut
//! off midway leaves a partial state that a repeated `restore --force` completes.

use super::{bad, decode, encode, now_ms, ApiResult, AppState, Body, Error};
use crate::api;
use crate::store::{Kind, Op};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use std::collections::BTreeSet;

/// Added to every lease epoch on restore.
pub const EPOCH_GAP: u64 = 1 << 20;
/// Added to `next_volume_id` on restore.
pub const ID_GAP: u64 = 1 << 20;
/// Store operations per restore transaction (etcd's default limit is 128).
const BATCH: usize = 100;

/// Every kind, with its name in a backup.
const KINDS: [(Kind, &str); 12] = [
    (Kind::Meta, "meta"),
    (Kind::Node, "node"),
    (Kind::Disk, "disk"),
    (Kind::Volume, "volume"),
    (Kind::Lease, "lease"),
    (Kind::Network, "network"),
    (Kind::Port, "port"),
    (Kind::Switch, "switch"),
    (Kind::NetIndex, "netindex"),
    (Kind::Vip, "vip"),
    (Kind::VipIndex, "vipindex"),
    (Kind::VipLease, "viplease"),
];

/// The name of a kind in a backup (an exhaustive match: a new kind must be named here).
pub(crate) fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Meta => "meta",
        Kind::Node => "node",
        Kind::Disk => "disk",
        Kind::Volume => "volume",
        Kind::Lease => "lease",
        Kind::Network => "network",
        Kind::Port => "port",
        Kind::Switch => "switch",
        Kind::NetIndex => "netindex",
        Kind::Vip => "vip",
        Kind::VipIndex => "vipindex",
        Kind::VipLease => "viplease",
        // Never backed up (not in `KINDS`): who leads is decided afresh.
        Kind::Leader => "leader",
    }
}

fn kind_of(name: &str) -> Option<Kind> {
    KINDS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
}

fn object(kind: Kind, name: String, v: Vec<u8>) -> api::BackupObject {
    match serde_json::from_slice::<serde_json::Value>(&v) {
        Ok(value) => api::BackupObject {
            kind: kind_name(kind).into(),
            name,
            value: Some(value),
            raw: None,
        },
        Err(_) => api::BackupObject {
            kind: kind_name(kind).into(),
            name,
            value: None,
            raw: Some(String::from_utf8_lossy(&v).into_owned()),
        },
    }
}

/// `GET /v1/backup`: every object at one revision (read again if a change lands between the
/// reads of two kinds).
#[utoipa::path(get, path = "/v1/backup", tag = "cluster",
    responses((status = 200, body = api::Backup, description = "Every stored object at one revision"),
        (status = 409, body = api::ApiError, description = "conflict: the state kept changing; retry")))]
pub(crate) async fn backup(State(app): State<AppState>) -> ApiResult<Json<api::Backup>> {
    let _g = app.mutate.lock().await;
    for _ in 0..10 {
        let rev = app.store.revision()?;
        let mut objects = Vec::new();
        for (kind, _) in KINDS {
            let (_, items) = app.store.list(kind)?;
            objects.extend(items.into_iter().map(|(n, v)| object(kind, n, v)));
        }
        if app.store.revision()? != rev {
            continue;
        }
        let cluster_id = match app.store.get(Kind::Meta, "cluster_id")? {
            Some(b) => String::from_utf8_lossy(&b).into_owned(),
            None => app.cluster_id.clone(),
        };
        return Ok(Json(api::Backup {
            format: api::BACKUP_FORMAT.into(),
            cluster_id,
            revision: rev,
            created_ms: now_ms(),
            objects,
        }));
    }
    Err(Error(
        StatusCode::CONFLICT,
        "conflict",
        "the state kept changing during the backup; retry".into(),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreQuery {
    /// Replace the cluster's current state (objects not in the backup are deleted).
    #[serde(default)]
    force: bool,
}

/// The stored bytes of a backed-up object, checked against its kind's type where the manager
/// reads it as one (a backup edited by hand must not plant a record the API cannot decode).
fn value_bytes(kind: Kind, o: &api::BackupObject) -> ApiResult<Vec<u8>> {
    let what = || format!("{} {:?}", o.kind, o.name);
    let bytes = match (&o.value, &o.raw) {
        (Some(v), None) => encode(v),
        (None, Some(r)) => r.clone().into_bytes(),
        _ => {
            return Err(bad(format!(
                "{}: give exactly one of value and raw",
                what()
            )))
        }
    };
    fn check<T: serde::de::DeserializeOwned>(b: &[u8], what: String) -> ApiResult<()> {
        serde_json::from_slice::<T>(b)
            .map(|_| ())
            .map_err(|e| bad(format!("{what}: {e}")))
    }
    match kind {
        Kind::Node => check::<api::Node>(&bytes, what())?,
        Kind::Disk => check::<api::Disk>(&bytes, what())?,
        Kind::Volume => check::<api::Volume>(&bytes, what())?,
        Kind::Lease => check::<api::Lease>(&bytes, what())?,
        Kind::Network => check::<api::Network>(&bytes, what())?,
        Kind::Port => check::<api::Port>(&bytes, what())?,
        Kind::Vip => check::<api::Vip>(&bytes, what())?,
        Kind::VipLease => check::<api::VipLease>(&bytes, what())?,
        _ => {}
    }
    if o.name.is_empty() || o.name.len() > 512 {
        return Err(bad(format!("{}: bad name", what())));
    }
    Ok(bytes)
}

/// `POST /v1/restore[?force=true]`: writes a backup into this cluster (see the module docs).
#[utoipa::path(post, path = "/v1/restore", tag = "cluster", params(RestoreQuery),
    request_body = api::Backup,
    responses((status = 200, body = api::RestoreReport, description = "Restored"),
        (status = 409, body = api::ApiError, description = "not_empty: the cluster has volumes, networks, ports or VIPs (use force)")))]
pub(crate) async fn restore(
    State(app): State<AppState>,
    Query(q): Query<RestoreQuery>,
    Body(b): Body<api::Backup>,
) -> ApiResult<Json<api::RestoreReport>> {
    if b.format != api::BACKUP_FORMAT {
        return Err(bad(format!(
            "backup format {:?} is not {:?}",
            b.format,
            api::BACKUP_FORMAT
        )));
    }
    if b.cluster_id.is_empty() {
        return Err(bad("backup has no cluster_id"));
    }
    // Decode and check everything before anything is written.
    let mut want: Vec<(Kind, String, Vec<u8>)> = Vec::with_capacity(b.objects.len());
    let mut seen = BTreeSet::new();
    for o in &b.objects {
        let kind = kind_of(&o.kind).ok_or_else(|| bad(format!("unknown kind {:?}", o.kind)))?;
        if !seen.insert((kind_name(kind), o.name.clone())) {
            return Err(bad(format!("{} {:?} appears twice", o.kind, o.name)));
        }
        want.push((kind, o.name.clone(), value_bytes(kind, o)?));
    }
    let _g = app.mutate.lock().await;
    let mut existing = Vec::new();
    for (kind, _) in KINDS {
        for (n, v) in app.store.list(kind)?.1 {
            existing.push((kind, n, v));
        }
    }
    let busy: Vec<String> = existing
        .iter()
        .filter(|(k, _, _)| matches!(k, Kind::Volume | Kind::Network | Kind::Port | Kind::Vip))
        .map(|(k, n, _)| format!("{} {n}", kind_name(*k)))
        .take(5)
        .collect();
    if !busy.is_empty() && !q.force {
        return Err(Error(
            StatusCode::CONFLICT,
            "not_empty",
            format!(
                "the cluster already has state ({}…); restore into an empty cluster, or force it (fabctl restore --force) to replace everything",
                busy.join(", ")
            ),
        ));
    }
    // Epochs move past both the backup's and this cluster's.
    let current_epoch = |kind: Kind, name: &str| -> u64 {
        existing
            .iter()
            .find(|(k, n, _)| *k == kind && n == name)
            .and_then(|(_, _, v)| match kind {
                Kind::Lease => decode::<api::Lease>(v).ok().map(|l| l.epoch),
                _ => decode::<api::VipLease>(v).ok().map(|l| l.epoch),
            })
            .unwrap_or(0)
    };
    let mut bumped = 0u64;
    let now = now_ms();
    let mut ops = Vec::with_capacity(want.len() + 1);
    for (kind, name, bytes) in &want {
        let bytes = match kind {
            Kind::Lease => {
                let mut l: api::Lease = decode(bytes)?;
                l.epoch = l.epoch.max(current_epoch(*kind, name)) + EPOCH_GAP;
                bumped += 1;
                encode(&l)
            }
            Kind::VipLease => {
                let mut l: api::VipLease = decode(bytes)?;
                l.epoch = l.epoch.max(current_epoch(*kind, name)) + EPOCH_GAP;
                l.expires_ms = now;
                bumped += 1;
                encode(&l)
            }
            Kind::Meta if name == "next_volume_id" => {
                let id: u64 = decode(bytes)?;
                encode(&(id + ID_GAP))
            }
            _ => bytes.clone(),
        };
        ops.push(Op::Put(*kind, name.clone(), bytes));
    }
    if !want
        .iter()
        .any(|(k, n, _)| *k == Kind::Meta && n == "cluster_id")
    {
        ops.push(Op::Put(
            Kind::Meta,
            "cluster_id".into(),
            b.cluster_id.clone().into_bytes(),
        ));
    }
    let keep: BTreeSet<(&'static str, &str)> = want
        .iter()
        .map(|(k, n, _)| (kind_name(*k), n.as_str()))
        .chain(std::iter::once(("meta", "cluster_id")))
        .collect();
    let mut deleted = 0u64;
    for (kind, n, _) in &existing {
        if !keep.contains(&(kind_name(*kind), n.as_str())) {
            ops.push(Op::Delete(*kind, n.clone()));
            deleted += 1;
        }
    }
    let mut rev = app.store.revision()?;
    for chunk in ops.chunks(BATCH) {
        rev = app.store.commit(&[], chunk)?;
    }
    app.volume_rev.send_replace(rev);
    app.net_rev.send_replace(rev);
    app.vips.rev.send_replace(rev);
    tracing::warn!(
        objects = want.len(),
        deleted,
        leases_bumped = bumped,
        from_revision = b.revision,
        cluster_id = %b.cluster_id,
        "cluster state restored from a backup"
    );
    Ok(Json(api::RestoreReport {
        restored: want.len() as u64,
        deleted,
        leases_bumped: bumped,
        cluster_id: b.cluster_id,
        revision: rev,
    }))
}
