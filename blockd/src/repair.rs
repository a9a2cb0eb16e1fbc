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
        for idx in idxs {
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
    for r in reps.values() {
        if let Replica::Remote(c) = r {
            c.close();
        }
    }
    Ok(report)
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
}
