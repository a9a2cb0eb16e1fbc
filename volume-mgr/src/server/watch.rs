//! `GET /v1/watch?since=REV&kinds=volume,port,…&timeout_ms=N`: the changes after a revision,
//! for agents that keep a copy of the state and apply deltas instead of re-reading everything.
//!
//! A client lists once (every list answer carries its `revision`), then watches from that
//! revision, and resumes from the `revision` of each answer, also after a reconnect or a
//! failover to another manager of the same store (revisions are the store's). When the store no
//! longer has the history after `since` the answer is 410 `compacted`: list again.
//!
//! Records are as stored: a node's `state` is the registered record's, not the liveness the
//! node list computes from heartbeats.

use super::{backup::kind_name, bad, ApiResult, AppState, Error};
use crate::api;
use crate::store::{Change, Kind, StoreError};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use std::time::Duration;

/// The kinds a watch may ask for.
const WATCHABLE: [Kind; 9] = [
    Kind::Node,
    Kind::Disk,
    Kind::Volume,
    Kind::Lease,
    Kind::Network,
    Kind::Port,
    Kind::Switch,
    Kind::Vip,
    Kind::VipLease,
];
/// Events per answer (a commit is never split, so an answer can hold a few more).
const LIMIT: usize = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct WatchParams {
    /// The revision the client has seen (from a list or the previous watch).
    since: u64,
    /// Comma-separated kinds [default: all watchable kinds].
    kinds: Option<String>,
    /// How long to wait for a change, at most 60000 [default: 30000].
    timeout_ms: Option<u64>,
}

fn parse_kinds(s: Option<&str>) -> ApiResult<Vec<Kind>> {
    let Some(s) = s else {
        return Ok(WATCHABLE.to_vec());
    };
    let mut out = Vec::new();
    for k in s.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        match WATCHABLE.iter().find(|w| kind_name(**w) == k) {
            Some(w) => out.push(*w),
            None => {
                return Err(bad(format!(
                    "unknown kind {k:?}: give some of node, disk, volume, lease, network, port, switch, vip, viplease"
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(bad("kinds: give at least one kind"));
    }
    Ok(out)
}

fn event(c: Change) -> api::WatchEvent {
    let object = c.value.as_deref().map(|b| {
        serde_json::from_slice(b)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(b).into()))
    });
    api::WatchEvent {
        rev: c.rev,
        kind: kind_name(c.kind).into(),
        name: c.name,
        deleted: c.value.is_none(),
        object,
    }
}

#[utoipa::path(get, path = "/v1/watch", tag = "cluster", params(WatchParams),
    responses((status = 200, body = api::WatchEvents, description = "Changes after `since` (none: the timeout passed)"),
        (status = 410, body = api::ApiError, description = "compacted: the history after `since` is gone; list again")))]
pub(crate) async fn watch(
    State(app): State<AppState>,
    q: Result<Query<WatchParams>, QueryRejection>,
) -> ApiResult<Json<api::WatchEvents>> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let kinds = parse_kinds(q.kinds.as_deref())?;
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(60_000));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rx = app.store.subscribe();
    let mut stop = app.stopping.subscribe();
    let mut since = q.since;
    let current = app.store.revision()?;
    if since > current {
        return Err(bad(format!(
            "since {since} is past the store's revision {current}"
        )));
    }
    loop {
        let current = app.store.revision()?;
        if current > since {
            let changes = match app.store.changes(since, LIMIT) {
                Ok(c) => c,
                Err(StoreError::Compacted(oldest)) => {
                    return Err(Error(
                        StatusCode::GONE,
                        "compacted",
                        format!(
                        "history after revision {since} is gone (kept from {oldest}); list again"
                    ),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            let full = changes.len() >= LIMIT;
            let last = changes.last().map(|c| c.rev).unwrap_or(since);
            let events: Vec<api::WatchEvent> = changes
                .into_iter()
                .filter(|c| kinds.contains(&c.kind))
                .map(event)
                .collect();
            // Everything up to `current` was read unless the answer was cut at LIMIT.
            since = if full { last } else { last.max(current) };
            if !events.is_empty() {
                return Ok(Json(api::WatchEvents {
                    revision: since,
                    events,
                }));
            }
            continue;
        }
        let woke = tokio::select! {
            r = rx.recv() => Some(matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed))),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = stop.wait_for(|s| *s) => None,
        };
        match woke {
            None => {
                return Ok(Json(api::WatchEvents {
                    revision: since,
                    events: Vec::new(),
                }))
            }
            // The feed ended: poll.
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(false) => {}
        }
    }
}
