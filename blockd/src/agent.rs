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
            .watch_volumes(revision, Duration::from_secs(30))
            .await
        {
            Ok(list) => {
                failures = 0;
                revision = list.revision;
                let infos: Vec<VolumeInfo> = list
                    .items
                    .into_iter()
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
