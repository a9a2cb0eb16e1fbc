//! `fabctl volume verify NAME --repair`: makes every in-service replica of every chunk hold
//! the same good data.
//!
//! The rule: each chunk is fetched whole from every in-service member of its set (a fetch
//! checks every written block's crc32 and fails on a bad one). The source is the copy with
//! the highest chunk version among those whose checksums are all good (ties: the first in
//! placement order). Every other member whose copy failed its checksums, has another version,
//! or holds other bytes gets the source's image installed (version set to the source's).
//! No good copy: the chunk is reported unrepairable and left alone.
//!
//! Copies travel with the volume's current lease epoch (never a newer one, so the lease
//! holder is not fenced). Run it on an idle volume: a write racing the repair of the same
//! chunk can be undone on the copy being replaced (the verify run after the repair then
//! reports the difference).

use crate::gateway::{chunk_of, Replica};
use crate::replica::client::{ReplicaClient, ReplicaError};
use crate::replica::service::EIO;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use volume_mgr::client::Client;

/// What a repair pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    pub chunks_checked: usize,
    /// One line per copy replaced: `chunk I on NODE <- SOURCE (version V): WHY`.
    pub repaired: Vec<String>,
    /// Chunks with no good copy, and copies that could not be replaced.
    pub failed: Vec<String>,
    pub unreachable: Vec<String>,
}

/// A member's copy of a chunk as fetched.
enum Copy {
    Good(u64, Vec<u8>),
    BadChecksum,
    Failed(String),
}

/// Picks the source among `(node, copy)` by the rule above; `None` if no copy is good.
fn source(copies: &[(String, Copy)]) -> Option<(&str, u64, &[u8])> {
    let mut best: Option<(&str, u64, &[u8])> = None;
    for (n, c) in copies {
        if let Copy::Good(v, img) = c {
            if best.is_none_or(|(_, bv, _)| *v > bv) {
                best = Some((n.as_str(), *v, img.as_slice()));
            }
        }
    }
    best
}

pub async fn repair_volume(
    client: &Client,
    name: &str,
    secret: &[u8],
    timeout: Duration,
) -> Result<RepairReport, String> {
    repair_volume_with_progress(client, name, secret, timeout, |_, _| {}).await
}

/// [`repair_volume`], calling `progress(done, total)` as it goes: bytes of chunks checked
/// (a chunk counts its full size once, whatever its replica count) out of the bytes of every
/// chunk some replica holds; before each chunk (the first call has `done == 0`) and once
/// at the end (`done == total`).
pub async fn repair_volume_with_progress(
    client: &Client,
    name: &str,
    secret: &[u8],
    timeout: Duration,
    mut progress: impl FnMut(u64, u64),
) -> Result<RepairReport, String> {
    let vol = client.get_volume(name).await.map_err(|e| e.to_string())?;
    let cluster = client
        .cluster()
        .await
        .map_err(|e| e.to_string())?
        .cluster_id;
    let epoch = client
        .list_leases()
        .await
        .map_err(|e| e.to_string())?
        .items
        .into_iter()
        .find(|l| l.volume == vol.name)
        .map(|l| l.epoch)
        .unwrap_or(0);
    let mut report = RepairReport::default();
    let nodes: BTreeSet<String> = vol
        .sets
        .iter()
        .flat_map(|s| s.members.iter().filter(|m| m.in_service))
        .map(|m| m.node.clone())
        .collect();
    let mut reps: BTreeMap<String, Replica> = BTreeMap::new();
    let mut indices: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for n in nodes {
        let r = async {
            let node = client
                .get_node(&n)
                .await
                .map_err(|e| ReplicaError::Down(e.to_string()))?;
            let c =
                ReplicaClient::connect_timeout(&node.address, &cluster, "fabctl", secret, timeout)
                    .await
                    .map_err(|e| ReplicaError::Down(format!("{}: {e}", node.address)))?;
            let r = Replica::Remote(Arc::new(c));
            let v = r.versions(vol.id, epoch).await?;
            Ok::<_, ReplicaError>((r, v))
        }
        .await;
        match r {
            Ok((r, v)) => {
                indices.insert(n.clone(), v.keys().copied().collect());
                reps.insert(n, r);
            }
            Err(e) => report.unreachable.push(format!("{n}: {e}")),
        }
    }
    let nsets = vol.sets.len().max(1) as u64;
    let mut work = Vec::with_capacity(vol.sets.len());
    for (s, set) in vol.sets.iter().enumerate() {
        let members: Vec<&str> = set
            .members
            .iter()
            .filter(|m| m.in_service && reps.contains_key(&m.node))
            .map(|m| m.node.as_str())
            .collect();
        let idxs: BTreeSet<u64> = members
            .iter()
            .flat_map(|n| indices[*n].iter().copied())
            .filter(|i| i % nsets == s as u64)
            .collect();
        work.push((members, idxs));
    }
    let total = work.iter().map(|(_, i)| i.len() as u64).sum::<u64>() * vol.chunk_size;
    let mut done = 0u64;
    for (members, idxs) in work {
        for idx in idxs {
            // Before each chunk: the chunks done so far (the first call tells the total).
            progress(done, total);
            done += vol.chunk_size;
            report.chunks_checked += 1;
            let chunk = chunk_of(vol.id, idx);
            let mut copies = Vec::new();
            for n in &members {
                let c = match reps[*n].fetch(chunk, epoch).await {
                    Ok((v, img)) => Copy::Good(v, img),
                    Err(ReplicaError::Status(EIO)) => Copy::BadChecksum,
                    Err(e) => Copy::Failed(e.to_string()),
                };
                copies.push((n.to_string(), c));
            }
            let Some((src, version, image)) = source(&copies) else {
                report.failed.push(format!(
                    "chunk {idx}: no copy with good checksums on {}",
                    members.join(", ")
                ));
                continue;
            };
            for (n, c) in &copies {
                let why = match c {
                    Copy::Good(v, _) if *v != version => format!("version {v}"),
                    Copy::Good(_, img) if img.as_slice() != image => "other data".to_string(),
                    Copy::Good(..) => continue,
                    Copy::BadChecksum => "bad checksum".to_string(),
                    Copy::Failed(e) => {
                        report
                            .failed
                            .push(format!("chunk {idx} on {n}: fetch failed: {e}"));
                        continue;
                    }
                };
                match reps[n.as_str()].install(chunk, epoch, version, image).await {
                    Ok(()) => report.repaired.push(format!(
                        "chunk {idx} on {n} <- {src} (version {version}): {why}"
                    )),
                    Err(e) => report
                        .failed
                        .push(format!("chunk {idx} on {n}: install failed: {e}")),
                }
            }
        }
    }
    progress(done, total);
    for r in reps.values() {
        if let Replica::Remote(c) = r {
            c.close();
        }
    }
    Ok(report)
}

/// Bytes of set `s` of `v` (its chunks `s, s + n, s + 2n, …`), the share each member holds.
fn set_bytes(v: &volume_mgr::api::Volume, s: usize) -> u64 {
    let n = v.sets.len().max(1) as u64;
    let cs = v.chunk_size.max(1);
    let chunks = v.size.div_ceil(cs);
    let mine = chunks / n + u64::from((s as u64) < chunks % n);
    (mine * cs).min(v.size)
}

/// Replica bytes per node by the placement record (what each node's chunk list covers).
fn node_shares(v: &volume_mgr::api::Volume) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (s, set) in v.sets.iter().enumerate() {
        for m in &set.members {
            *out.entry(m.node.clone()).or_insert(0) += set_bytes(v, s);
        }
    }
    out
}

/// A progress callback: `(done, total)` bytes.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// `gateway::verify_volume` with progress: `progress(done, total)` in replica bytes (each
/// node's share of the volume by the placement record), called as each node's chunk list is
/// asked for and once at the end (`done == total`).
pub async fn verify_volume_with_progress(
    client: &Client,
    name: &str,
    secret: &[u8],
    timeout: Duration,
    progress: ProgressFn,
) -> Result<(volume_mgr::api::Volume, crate::gateway::VerifyReport), String> {
    let vol = client.get_volume(name).await.map_err(|e| e.to_string())?;
    let cluster = client
        .cluster()
        .await
        .map_err(|e| e.to_string())?
        .cluster_id;
    let shares = node_shares(&vol);
    let total: u64 = shares.values().sum();
    // (bytes of the nodes done, the node being asked now)
    let state: Arc<std::sync::Mutex<(u64, Option<String>)>> = Default::default();
    let client2 = client.clone();
    let secret = secret.to_vec();
    let (st, pr) = (state.clone(), progress.clone());
    let reach =
        move |node: String| -> futures::future::BoxFuture<'static, Result<Replica, ReplicaError>> {
            {
                let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(prev) = g.1.take() {
                    g.0 += shares.get(&prev).copied().unwrap_or(0);
                }
                g.1 = Some(node.clone());
                pr(g.0, total);
            }
            let client = client2.clone();
            let secret = secret.clone();
            let cluster = cluster.clone();
            Box::pin(async move {
                let n = client
                    .get_node(&node)
                    .await
                    .map_err(|e| ReplicaError::Down(e.to_string()))?;
                let c = ReplicaClient::connect_timeout(
                    &n.address, &cluster, "fabctl", &secret, timeout,
                )
                .await
                .map_err(|e| ReplicaError::Down(format!("{}: {e}", n.address)))?;
                Ok(Replica::Remote(Arc::new(c)))
            })
        };
    let report = crate::gateway::verify(&vol, reach).await;
    progress(total, total);
    Ok((vol, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_is_the_highest_good_version() {
        let copies = vec![
            ("a".to_string(), Copy::Good(4, vec![1])),
            ("b".to_string(), Copy::BadChecksum),
            ("c".to_string(), Copy::Good(7, vec![2])),
            ("d".to_string(), Copy::Good(7, vec![3])),
            ("e".to_string(), Copy::Failed("down".into())),
        ];
        assert_eq!(source(&copies), Some(("c", 7, &[2u8][..])));
        let none = vec![
            ("b".to_string(), Copy::BadChecksum),
            ("e".to_string(), Copy::Failed("down".into())),
        ];
        assert_eq!(source(&none), None);
    }

    #[test]
    fn shares_cover_every_replica() {
        let m = |n: &str| volume_mgr::api::Member {
            node: n.into(),
            in_service: true,
        };
        let v = volume_mgr::api::Volume {
            name: "v".into(),
            id: 1,
            size: 10 << 22,
            chunk_size: 4 << 20,
            replicas: 2,
            min_replicas: 1,
            sets: vec![
                volume_mgr::api::ChunkSet {
                    members: vec![m("a"), m("b")],
                },
                volume_mgr::api::ChunkSet {
                    members: vec![m("b"), m("c")],
                },
                volume_mgr::api::ChunkSet {
                    members: vec![m("a"), m("c")],
                },
            ],
            created_ms: 0,
        };
        // 10 chunks over 3 sets: 4, 3, 3.
        let s = node_shares(&v);
        assert_eq!(s["a"], 7 << 22);
        assert_eq!(s["b"], 7 << 22);
        assert_eq!(s["c"], 6 << 22);
        assert_eq!(s.values().sum::<u64>(), 2 * v.size);
    }
}
