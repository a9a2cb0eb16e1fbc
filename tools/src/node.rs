//! `fabctl node drain NAME` and `fabctl node rm NAME`.
//!
//! Drain marks the node draining in volume-mgr (durable; placement never picks it) and
//! follows the recovery controller as it moves every replica the node holds to other nodes
//! (the node's copy stays in service until the new one is): one line per change of what is
//! left, until the node holds nothing (or `--timeout` passes: exit 1). `--no-wait` returns
//! after marking. `rm` removes the node's record; volume-mgr refuses (409, naming the
//! volumes) while any chunk set still lists the node.

use std::time::{Duration, Instant};
use volume_mgr::client::Client;

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
