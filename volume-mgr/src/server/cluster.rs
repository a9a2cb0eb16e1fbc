//! Several managers over one shared store (etcd): what keeps them one control plane.
//!
//! - [`follow_store`]: every commit by any manager reaches this one through the store's change
//!   feed and wakes the long-polls that watch its kinds (volumes, networks/ports/switches,
//!   VIPs), so an agent watching manager A sees a change made through manager B.
//! - [`share_liveness`]: heartbeats live in memory (a heartbeat costs no store write), and
//!   agents send them to whichever manager answers first. With a shared store each manager
//!   publishes the heartbeats it received (`meta/live/<manager>`, one write per
//!   `down_after / 4`) and merges the others', so every manager — above all the leader, whose
//!   controllers act on liveness — sees every node's last heartbeat.
//! - Controllers (re-replication, switch liveness) run only on the elected leader
//!   ([`App::leads`]); their writes carry the leader's fence conditions.

use super::{encode, now_ms, App, Live};
use crate::api;
use crate::store::{Change, Kind, Op, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Key prefix (in `Kind::Meta`) of the published heartbeat tables.
pub(crate) const LIVE_PREFIX: &str = "live/";

/// What one manager publishes: the last heartbeat it received from each node and switch.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Published {
    at_ms: u64,
    nodes: BTreeMap<String, (u64, Vec<api::DiskSpec>)>,
    switches: BTreeMap<String, u64>,
}

/// Which long-polls a change wakes: (volumes, net state, VIPs). A VIP lease wakes VIP
/// watches only when a new tenure starts (its epoch moves), not on renewals, as for local
/// commits; `epochs` remembers the last epoch seen per VIP.
fn wakes(c: &Change, epochs: &mut HashMap<String, u64>) -> (bool, bool, bool) {
    match c.kind {
        Kind::Volume => (true, false, false),
        Kind::Network | Kind::Port | Kind::Switch => (false, true, false),
        Kind::Vip => (false, false, true),
        Kind::VipLease => {
            let epoch = c
                .value
                .as_deref()
                .and_then(|b| serde_json::from_slice::<api::VipLease>(b).ok())
                .map(|l| l.epoch);
            let changed = match epoch {
                Some(e) => epochs.insert(c.name.clone(), e) != Some(e),
                None => epochs.remove(&c.name).is_some(),
            };
            (false, false, changed)
        }
        _ => (false, false, false),
    }
}

fn bump(tx: &tokio::sync::watch::Sender<u64>, rev: u64) {
    tx.send_if_modified(|r| {
        if rev > *r {
            *r = rev;
            true
        } else {
            false
        }
    });
}

/// Follows the store's change feed (commits by every manager) and wakes the long-polls.
pub(crate) async fn follow_store(app: Arc<App>) {
    let mut rx = app.store.subscribe();
    let mut stop = app.stopping.subscribe();
    let mut seen = app.store.revision().unwrap_or(0);
    let mut epochs = HashMap::new();
    if let Ok((_, items)) = app.store.list(Kind::VipLease) {
        for (n, b) in items {
            if let Ok(l) = serde_json::from_slice::<api::VipLease>(&b) {
                epochs.insert(n, l.epoch);
            }
        }
    }
    loop {
        let closed = tokio::select! {
            r = rx.recv() => matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)),
            _ = tokio::time::sleep(Duration::from_secs(5)) => false,
            _ = stop.wait_for(|s| *s) => return,
        };
        if closed {
            // The store's feed ended: poll instead.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        loop {
            let app2 = app.clone();
            let r = tokio::task::spawn_blocking(move || app2.store.changes(seen, 1000)).await;
            match r {
                Ok(Ok(changes)) => {
                    let Some(last) = changes.last().map(|c| c.rev) else {
                        break;
                    };
                    let (mut v, mut n, mut p) = (false, false, false);
                    for c in &changes {
                        let (a, b, d) = wakes(c, &mut epochs);
                        v |= a;
                        n |= b;
                        p |= d;
                    }
                    if v {
                        bump(&app.volume_rev, last);
                    }
                    if n {
                        bump(&app.net_rev, last);
                    }
                    if p {
                        bump(&app.vips.rev, last);
                    }
                    seen = last;
                    if changes.len() < 1000 {
                        break;
                    }
                }
                Ok(Err(StoreError::Compacted(oldest))) => {
                    // History we did not read is gone: wake every watcher (they re-read).
                    let rev = app.store.revision().unwrap_or(oldest);
                    bump(&app.volume_rev, rev);
                    bump(&app.net_rev, rev);
                    bump(&app.vips.rev, rev);
                    seen = rev;
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "store change feed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Publishes this manager's heartbeats and merges the other managers' (shared store only).
pub(crate) async fn share_liveness(app: Arc<App>) {
    let tick = (app.cfg.down_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let me = format!("{LIVE_PREFIX}{}", app.leadership.id());
    let mut stop = app.stopping.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = now_ms();
        let horizon = app.cfg.down_after.as_millis() as u64 * 2;
        let mine = {
            let live = app.live.lock().unwrap();
            let sw = app.switch_live.lock().unwrap();
            Published {
                at_ms: now,
                nodes: live
                    .iter()
                    .filter(|(_, l)| now.saturating_sub(l.last_heartbeat_ms) < horizon)
                    .map(|(n, l)| (n.clone(), (l.last_heartbeat_ms, l.disks.clone())))
                    .collect(),
                switches: sw
                    .iter()
                    .filter(|(_, l)| now.saturating_sub(l.last_heartbeat_ms) < horizon)
                    .map(|(n, l)| (n.clone(), l.last_heartbeat_ms))
                    .collect(),
            }
        };
        let app2 = app.clone();
        let me2 = me.clone();
        let r = tokio::task::spawn_blocking(move || {
            if !mine.nodes.is_empty() || !mine.switches.is_empty() {
                app2.store
                    .commit(&[], &[Op::Put(Kind::Meta, me2.clone(), encode(&mine))])?;
            }
            app2.store.list(Kind::Meta)
        })
        .await;
        let items = match r {
            Ok(Ok((_, items))) => items,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot share heartbeats");
                continue;
            }
            Err(_) => continue,
        };
        let mut live = app.live.lock().unwrap();
        let mut sw = app.switch_live.lock().unwrap();
        for (k, b) in items {
            if !k.starts_with(LIVE_PREFIX) || k == me {
                continue;
            }
            let Ok(p) = serde_json::from_slice::<Published>(&b) else {
                continue;
            };
            for (node, (t, disks)) in p.nodes {
                let e = live.entry(node).or_insert(Live {
                    last_heartbeat_ms: 0,
                    disks: Vec::new(),
                });
                if t > e.last_heartbeat_ms {
                    e.last_heartbeat_ms = t;
                    e.disks = disks;
                }
            }
            for (node, t) in p.switches {
                let e = sw.entry(node).or_insert(super::network::SwitchLive {
                    last_heartbeat_ms: 0,
                    ports: BTreeMap::new(),
                });
                if t > e.last_heartbeat_ms {
                    e.last_heartbeat_ms = t;
                }
            }
        }
    }
}

impl App {
    /// Whether this manager runs the controllers now (always, with the embedded store).
    pub fn leads(&self) -> bool {
        self.leadership.is_leader()
    }

    /// The identity (API URL) of the leader as this manager last saw it.
    pub fn leader(&self) -> Option<String> {
        self.leadership.leader()
    }
}
