//! The agent side of blockd: registers the node and its disks with volume-mgr, heartbeats,
//! and follows the volume list through a long-poll watch so the catalog (and the data of
//! deleted volumes) stays in step with the control plane.

use crate::chunkstore::ChunkStore;
use crate::config::Config;
use crate::volume::{VolumeCatalog, VolumeInfo, VolumeLookup};
use std::sync::Arc;
use std::time::Duration;
use volume_mgr::api;
use volume_mgr::client::Client;

/// Looks volumes up in volume-mgr (for export names not seen through the watch yet).
#[derive(Clone)]
pub struct ManagerLookup {
    pub client: Client,
    /// Set once the manager's cluster id matched the disks'; nothing is served before.
    pub verified: tokio::sync::watch::Receiver<bool>,
}

impl VolumeLookup for ManagerLookup {
    async fn lookup(&self, name: &str) -> Option<VolumeInfo> {
        // Right after start-up the cluster check may still be running: wait for it a little
        // rather than telling the client the export does not exist.
        let mut rx = self.verified.clone();
        if !matches!(
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v)).await,
            Ok(Ok(_))
        ) {
            return None;
        }
        match self.client.get_volume(name).await {
            Ok(v) => Some(VolumeInfo {
                name: v.name,
                id: v.id,
                size: v.size,
            }),
            Err(e) => {
                tracing::debug!(volume = name, error = %e, "volume lookup failed");
                None
            }
        }
    }
}

fn disk_specs(store: &ChunkStore) -> Vec<api::DiskSpec> {
    store
        .stats()
        .into_iter()
        .map(|s| api::DiskSpec {
            path: s.path,
            capacity: s.capacity,
            used: s.used,
        })
        .collect()
}

fn registration(cfg: &Config, store: &ChunkStore) -> api::RegisterNode {
    api::RegisterNode {
        address: cfg.listen.to_string(),
        nbd_address: cfg.nbd_listen.map(|a| a.to_string()).unwrap_or_default(),
        nbd_socket: cfg.nbd_socket.as_ref().map(|p| p.display().to_string()),
        zone: cfg.zone.clone(),
        disks: disk_specs(store),
    }
}

/// Registers, then heartbeats every `heartbeat_interval` (re-registering if the manager
/// forgot the node). Runs until the task is dropped.
pub async fn heartbeat_loop(cfg: Arc<Config>, client: Client, store: Arc<ChunkStore>) {
    let mut registered = false;
    let mut failures = 0u32;
    loop {
        let r = if registered {
            client
                .heartbeat(
                    &cfg.node,
                    &api::Heartbeat {
                        disks: disk_specs(&store),
                    },
                )
                .await
        } else {
            client
                .register_node(&cfg.node, &registration(&cfg, &store))
                .await
                .map(|_| ())
        };
        match r {
            Ok(()) => {
                if !registered {
                    tracing::info!(node = %cfg.node, "registered with volume-mgr");
                }
                registered = true;
                failures = 0;
            }
            Err(e) => {
                if e.is_not_found() {
                    registered = false;
                }
                failures += 1;
                // One warning per outage plus one every minute or so, not one per beat.
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(node = %cfg.node, error = %e, failures, "cannot reach volume-mgr");
                }
            }
        }
        tokio::time::sleep(cfg.heartbeat_interval).await;
    }
}

/// Checks that the manager runs the cluster these disks belong to (recording its id on
/// first contact). A manager with another id (a wiped or different cluster) would hand out
/// volume ids that collide with the data here: blockd then serves nothing and deletes nothing.
async fn same_cluster(client: &Client, store: &Arc<ChunkStore>) -> Result<(), String> {
    let info = client.cluster().await.map_err(|e| e.to_string())?;
    let mine = store.cluster_id();
    if mine.is_empty() {
        let s = store.clone();
        let id = info.cluster_id.clone();
        tokio::task::spawn_blocking(move || s.set_cluster_id(&id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::info!(cluster_id = %info.cluster_id, "disks joined cluster");
        return Ok(());
    }
    if mine != info.cluster_id {
        return Err(format!("disks belong to cluster {mine}, but volume-mgr runs cluster {}; refusing to serve or delete anything", info.cluster_id));
    }
    Ok(())
}

/// Follows the volume list; deletes the data of volumes that disappear.
pub async fn watch_loop<L: VolumeLookup>(
    client: Client,
    catalog: Arc<VolumeCatalog<L>>,
    verified: tokio::sync::watch::Sender<bool>,
    node: String,
) {
    let mut revision = 0u64;
    let mut failures = 0u32;
    loop {
        match same_cluster(&client, catalog.store()).await {
            Ok(()) => {
                verified.send_replace(true);
                break;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::error!(error = %e, "cluster identity check failed; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    failures = 0;
    loop {
        match client
            .watch_volumes(revision, Duration::from_secs(10))
            .await
        {
            Ok(list) => {
                failures = 0;
                revision = list.revision;
                let vols = list.items;
                let infos: Vec<VolumeInfo> = vols
                    .iter()
                    .cloned()
                    .map(|v| VolumeInfo {
                        name: v.name,
                        id: v.id,
                        size: v.size,
                    })
                    .collect();
                let mut gone = catalog.sync(&infos);
                // Chunks of volumes the manager no longer has (deleted while we were down).
                let known: std::collections::BTreeSet<u64> = infos.iter().map(|i| i.id).collect();
                for id in catalog.store().volumes() {
                    if !known.contains(&id) && !gone.contains(&id) {
                        gone.push(id);
                    }
                }
                for id in gone {
                    match catalog.store().delete_volume(id).await {
                        Ok(n) => tracing::info!(
                            volume_id = id,
                            chunks = n,
                            "deleted data of removed volume"
                        ),
                        Err(e) => {
                            tracing::error!(volume_id = id, error = %e, "deleting data of removed volume failed")
                        }
                    }
                }
                recovery_duties(&client, &catalog, &node, &vols).await;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, failures, "volume watch failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis((200 * failures as u64).min(2000))).await;
            }
        }
    }
}

/// Sets of `v` this node may drop its chunks of: sets that no longer list it and whose
/// record has all `replicas` members in service elsewhere (re-homed and copied; never the
/// last copy). Pure (unit-tested).
pub fn rehomed_sets(v: &api::Volume, me: &str) -> Vec<u64> {
    v.sets
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            !s.members.iter().any(|m| m.node == me)
                && s.members.iter().filter(|m| m.in_service).count() >= v.replicas.max(1) as usize
        })
        .map(|(i, _)| i as u64)
        .collect()
}

/// Whether this node should attach `v` to copy to its out-of-service replicas when no live
/// gateway does: it holds the lease, or nobody does / the holder is out (silent past
/// `out_after`, `out` lists those) and this is the first (by name) up node with a replica
/// out of service. A holder that is merely down keeps its lease: it may be cut off from
/// the manager only, still serving its VM, and taking the lease would fence it. Pure
/// (unit-tested).
pub fn should_drive(
    v: &api::Volume,
    me: &str,
    holder: Option<&str>,
    up: &[String],
    out: &[String],
) -> bool {
    let mut waiting: Vec<&str> = v
        .sets
        .iter()
        .flat_map(|s| s.members.iter())
        .filter(|m| !m.in_service && up.contains(&m.node))
        .map(|m| m.node.as_str())
        .collect();
    if waiting.is_empty() {
        return false;
    }
    waiting.sort_unstable();
    match holder {
        Some(h) if h == me => true,
        Some(h) if !out.iter().any(|o| o == h) => false,
        _ => waiting[0] == me,
    }
}

/// Re-replication duties of this node after a volume list change (and at least every 10 s,
/// when the watch times out):
/// - drop the chunks of sets re-homed away from this node, once a fresh read of the
///   volume's record confirms they no longer list it and are fully in service elsewhere;
/// - attach volumes that have replicas to copy to and no live gateway (see
///   [`should_drive`]): the attachment's resync loop copies and records them in service.
async fn recovery_duties<L: VolumeLookup>(
    client: &Client,
    catalog: &Arc<VolumeCatalog<L>>,
    me: &str,
    vols: &[api::Volume],
) {
    use crate::export::ExportCatalog;
    let held = catalog.store().chunk_indices();
    for v in vols {
        let nsets = v.sets.len() as u64;
        let Some(mine) = held.get(&v.id) else {
            continue;
        };
        if nsets == 0 {
            continue;
        }
        let rehomed = rehomed_sets(v, me);
        if !mine.iter().any(|i| rehomed.contains(&(i % nsets))) {
            continue;
        }
        // The manager confirms: a fresh read, not the (possibly older) watch result.
        let fresh = match client.get_volume(&v.name).await {
            Ok(f) if f.id == v.id && f.sets.len() as u64 == nsets => f,
            _ => continue,
        };
        let drop_sets = rehomed_sets(&fresh, me);
        // The gateway here (if the volume is attached) stops reading those sets locally
        // before their chunks go.
        catalog.sync_attached_record(&fresh).await;
        match catalog
            .store()
            .delete_chunks(v.id, |i| drop_sets.contains(&(i % nsets)))
            .await
        {
            Ok(n) if n > 0 => {
                tracing::info!(volume = %v.name, chunks = n, sets = ?drop_sets, "dropped chunks of sets re-homed to other nodes")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(volume = %v.name, error = %e, "dropping re-homed chunks failed")
            }
        }
    }
    let mut up: Option<(Vec<String>, Vec<String>)> = None;
    for v in vols {
        let waiting = v
            .sets
            .iter()
            .flat_map(|s| s.members.iter())
            .any(|m| !m.in_service);
        if !waiting {
            continue;
        }
        if up.is_none() {
            match (client.list_nodes().await, client.recovery().await) {
                (Ok(l), Ok(r)) => {
                    up = Some((
                        l.items
                            .into_iter()
                            .filter(|n| n.state == api::NodeState::Up)
                            .map(|n| n.name)
                            .collect(),
                        r.nodes_out,
                    ))
                }
                _ => return,
            }
        }
        let Some((up, out)) = up.as_ref() else { return };
        let holder = match client.get_lease(&v.name).await {
            Ok(l) => Some(l.holder),
            Err(e) if e.is_not_found() => None,
            Err(_) => continue,
        };
        if should_drive(v, me, holder.as_deref(), up, out) {
            tracing::info!(volume = %v.name, "replicas to copy and no live gateway: attaching here to copy them");
            if tokio::time::timeout(Duration::from_secs(30), catalog.open(&v.name))
                .await
                .ok()
                .flatten()
                .is_none()
            {
                tracing::warn!(volume = %v.name, "cannot attach to copy replicas; retrying later");
            }
        }
    }
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    fn vol(sets: Vec<Vec<(&str, bool)>>) -> api::Volume {
        api::Volume {
            name: "v".into(),
            id: 1,
            size: 1 << 30,
            chunk_size: api::DEFAULT_CHUNK_SIZE,
            replicas: 2,
            min_replicas: 1,
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

    #[test]
    fn drops_only_fully_rehomed_sets() {
        let v = vol(vec![
            vec![("a", true), ("b", true)],  // mine? no: fully elsewhere -> drop
            vec![("a", true), ("me", true)], // lists me
            vec![("a", true), ("c", false)], // still copying: keep
        ]);
        assert_eq!(rehomed_sets(&v, "me"), vec![0]);
        assert_eq!(rehomed_sets(&v, "c"), vec![0, 1]);
    }

    #[test]
    fn one_driver() {
        let v = vol(vec![
            vec![("a", true), ("c", false)],
            vec![("b", false), ("a", true)],
        ]);
        let up: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let out: Vec<String> = vec!["a".into()];
        // The holder drives; nobody else while it is not out (up, or down but not out).
        assert!(should_drive(&v, "a", Some("a"), &up, &[]));
        assert!(!should_drive(&v, "b", Some("a"), &up, &[]));
        let up2: Vec<String> = ["b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(!should_drive(&v, "b", Some("a"), &up2, &[]));
        // Holder out or no lease: the first waiting node by name.
        assert!(should_drive(&v, "b", Some("a"), &up2, &out));
        assert!(!should_drive(&v, "c", Some("a"), &up2, &out));
        assert!(should_drive(&v, "b", None, &up, &[]));
        // Nothing to copy to (waiting nodes down): nobody.
        let v2 = vol(vec![vec![("a", true), ("c", false)]]);
        assert!(!should_drive(&v2, "a", Some("a"), &["a".to_string()], &[]));
    }
}
