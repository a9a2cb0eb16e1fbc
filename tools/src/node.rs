//! `fabctl node ls`, `fabctl node drain NAME` and `fabctl node rm NAME`.
//!
//! `ls` shows every node's state (up, down, or out: silent past `out_after`, its replicas
//! re-homed), whether it is draining or full (every disk past the manager's `full_ratio`:
//! it takes no new chunks), the chunk sets and chunks placed on it (and how many of those
//! copies are still syncing) and its disks' use, from `GET /v1/nodes` and `GET /v1/recovery`.
//!
//! Drain marks the node draining in volume-mgr (durable; placement never picks it) and
//! follows the recovery controller as it moves every replica the node holds to other nodes
//! (the node's copy stays in service until the new one is): one line per change of what is
//! left, until the node holds nothing (or `--timeout` passes: exit 1). `--no-wait` returns
//! after marking. `rm` removes the node's record; volume-mgr refuses (409, naming the
//! volumes) while any chunk set still lists the node.

use std::time::{Duration, Instant};
use volume_mgr::api;
use volume_mgr::client::Client;

/// One row of `fabctl node ls` (pure: unit-tested). `h` is None when the manager gave no
/// health for the node (an older manager).
pub fn ls_row(n: &api::Node, h: Option<&api::NodeHealth>, heartbeat: String) -> Vec<String> {
    let state = match (n.state, h) {
        (api::NodeState::Down, Some(h)) if h.out => "out",
        (api::NodeState::Down, _) => "down",
        (api::NodeState::Up, _) => "up",
    };
    let mut flags = Vec::new();
    if h.is_some_and(|h| h.draining) {
        flags.push("draining");
    }
    if h.is_some_and(|h| h.full) {
        flags.push("full");
    }
    let dash = || "-".to_string();
    vec![
        n.name.clone(),
        state.to_string(),
        n.zone.clone(),
        n.address.clone(),
        n.nbd_address.clone(),
        if flags.is_empty() {
            dash()
        } else {
            flags.join(",")
        },
        h.map(|h| {
            if h.syncing > 0 {
                format!("{} ({} syncing)", h.sets, h.syncing)
            } else {
                h.sets.to_string()
            }
        })
        .unwrap_or_else(dash),
        h.map(|h| h.chunks.to_string()).unwrap_or_else(dash),
        h.map(|h| {
            let pct = if h.capacity == 0 {
                0.0
            } else {
                100.0 * h.used as f64 / h.capacity as f64
            };
            format!(
                "{} / {} ({pct:.0}%)",
                crate::human(h.used),
                crate::human(h.capacity)
            )
        })
        .unwrap_or_else(dash),
        heartbeat,
    ]
}

/// The column names of [`ls_row`].
pub const LS_HEADER: [&str; 10] = [
    "NAME",
    "STATE",
    "ZONE",
    "ADDRESS",
    "NBD",
    "FLAGS",
    "SETS",
    "CHUNKS",
    "USED",
    "HEARTBEAT",
];

/// `fabctl node ls`: a table, or (`json`) the nodes with their health fields merged in
/// (`out`, `draining`, `full`, `sets`, `syncing`, `chunks`, `used`, `capacity`).
pub async fn ls(client: &Client, json: bool) -> anyhow::Result<()> {
    let nodes = client.list_nodes().await?.items;
    // Health is extra: a manager that cannot give it still lists the nodes.
    let health: Vec<api::NodeHealth> = match client.recovery().await {
        Ok(r) => r.nodes,
        Err(e) => {
            eprintln!("fabctl: node health unavailable: {e}");
            Vec::new()
        }
    };
    let find = |name: &str| health.iter().find(|h| h.name == name);
    if json {
        let mut out = Vec::new();
        for n in &nodes {
            let mut v = serde_json::to_value(n)?;
            if let (Some(h), Some(o)) = (find(&n.name), v.as_object_mut()) {
                if let serde_json::Value::Object(hm) = serde_json::to_value(h)? {
                    for (k, x) in hm {
                        if k != "name" {
                            o.insert(k, x);
                        }
                    }
                }
            }
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| ls_row(n, find(&n.name), crate::ago(n.last_heartbeat_ms)))
        .collect();
    crate::table::print(&LS_HEADER, &rows);
    Ok(())
}

/// Marks `name` draining and (unless `no_wait`) waits until it holds no replica.
pub async fn drain(
    client: &Client,
    name: &str,
    no_wait: bool,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<i32> {
    let mut d = client.drain_node(name).await?;
    if !json {
        println!("node {name}: draining");
    }
    if no_wait {
        if json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
        return Ok(0);
    }
    let start = Instant::now();
    let mut last: Option<Vec<String>> = None;
    let mut last_line = Instant::now();
    loop {
        if d.volumes.is_empty() {
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!(
                    "node {name}: drained in {:.1} s; it holds no replica (fabctl node rm {name})",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(0);
        }
        if !json && (last.as_ref() != Some(&d.volumes) || last_line.elapsed() >= LINE_EVERY) {
            println!(
                "node {name}: {:>5.1} s  replicas left in {}{}",
                start.elapsed().as_secs_f64(),
                d.volumes.join(", "),
                copy_state(client).await
            );
            last = Some(d.volumes.clone());
            last_line = Instant::now();
        }
        if start.elapsed() > timeout {
            eprintln!(
                "node {name}: still holds replicas after {timeout:?}: {}",
                d.volumes.join(", ")
            );
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Marking again is idempotent and answers what is left.
        d = client.drain_node(name).await?;
    }
}

/// A line at least this often while draining (the copy's rate and ETA move on even when the
/// list of volumes does not).
const LINE_EVERY: Duration = Duration::from_secs(5);

/// The cluster's copy progress from `GET /v1/recovery`: `; copying 40 MiB left at 20 MiB/s,
/// ETA 2 s` (empty when nothing is being copied or the manager does not answer).
async fn copy_state(client: &Client) -> String {
    let Ok(r) = client.recovery().await else {
        return String::new();
    };
    if r.bytes_left == 0 {
        return String::new();
    }
    let mut s = format!(
        "; copying {} left at {}/s",
        crate::progress::human(r.bytes_left),
        crate::progress::human(r.rate.max(0.0) as u64)
    );
    if let Some(eta) = r.eta_s.filter(|e| e.is_finite() && *e >= 0.0) {
        s.push_str(&format!(
            ", ETA {}",
            crate::progress::duration(Duration::from_secs_f64(eta.min(1e7)))
        ));
    }
    s
}

/// Removes the node's record (refused while it holds replicas).
pub async fn rm(client: &Client, name: &str) -> anyhow::Result<()> {
    client.remove_node(name).await?;
    println!("node {name} removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_rows_show_state_flags_and_share() {
        let n = |state| api::Node {
            name: "h4".into(),
            address: "198.18.0.5:7800".into(),
            nbd_address: String::new(),
            nbd_socket: None,
            zone: "h4".into(),
            state,
            last_heartbeat_ms: 0,
            registered_ms: 0,
        };
        let h = api::NodeHealth {
            name: "h4".into(),
            out: true,
            draining: true,
            full: true,
            sets: 12,
            syncing: 2,
            chunks: 24,
            used: 96 << 20,
            capacity: 1 << 30,
        };
        let r = ls_row(&n(api::NodeState::Down), Some(&h), "5s ago".into());
        assert_eq!(r.len(), LS_HEADER.len());
        assert_eq!(r[1], "out");
        assert_eq!(r[5], "draining,full");
        assert_eq!(r[6], "12 (2 syncing)");
        assert_eq!(r[7], "24");
        assert_eq!(r[8], "96 MiB / 1 GiB (9%)");
        let r = ls_row(&n(api::NodeState::Up), Some(&h), String::new());
        assert_eq!(r[1], "up");
        let calm = api::NodeHealth {
            out: false,
            draining: false,
            full: false,
            syncing: 0,
            ..h
        };
        let r = ls_row(&n(api::NodeState::Down), Some(&calm), String::new());
        assert_eq!(
            (r[1].as_str(), r[5].as_str(), r[6].as_str()),
            ("down", "-", "12")
        );
        let r = ls_row(&n(api::NodeState::Up), None, String::new());
        assert_eq!(
            (r[5].as_str(), r[6].as_str(), r[8].as_str()),
            ("-", "-", "-")
        );
    }
}
