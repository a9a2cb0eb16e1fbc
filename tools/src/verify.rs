//! `fabctl volume verify NAME`: compares the version and content digest of every chunk on
//! every replica of a volume (talking to each host's replica protocol with the cluster
//! secret) and prints each difference; exit status 1 if there is any, or if a replica could
//! not be reached. With `--repair` a repair pass runs first (`blockd::repair`: every
//! in-service copy of each chunk gets the copy with the highest chunk version whose checksums
//! are all good) and prints what it replaced; the verify after it decides the exit status.
//!
//! Progress goes to stderr (`crate::progress`: a bar on a terminal, a plain line every few
//! seconds otherwise, and one when done): the repair in bytes of chunks checked, the verify
//! in replica bytes whose chunk lists were compared.

use crate::progress::Progress;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use volume_mgr::client::Client;

/// A progress display created on the first report (when the total is known), shared with
/// the callback blockd calls.
#[derive(Clone)]
struct Shown {
    label: String,
    p: Arc<Mutex<Option<Progress>>>,
}

impl Shown {
    fn new(label: String) -> Shown {
        Shown {
            label,
            p: Arc::default(),
        }
    }

    fn report(&self, done: u64, total: u64) {
        let mut g = self.p.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(|| Progress::new(self.label.clone(), total))
            .set(done);
    }

    fn finish(&self) {
        if let Some(p) = self.p.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            p.finish();
        }
    }
}

/// Default location of the cluster secret (the file blockd reads with `--secret-file`).
pub const DEFAULT_SECRET_FILE: &str = "/etc/fabric/cluster.secret";

/// Runs the check; returns the process exit code (0 equal, 1 differences or unreachable).
pub async fn run(
    client: &Client,
    name: &str,
    secret_file: &Path,
    json: bool,
    repair: bool,
) -> anyhow::Result<i32> {
    let secret = std::fs::read(secret_file).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the cluster secret {}: {e} (give --secret-file, the file blockd uses)",
            secret_file.display()
        )
    })?;
    let secret = secret.trim_ascii().to_vec();
    let repaired = if repair {
        let shown = Shown::new(format!("repair {name}"));
        let sh = shown.clone();
        let r = blockd::repair::repair_volume_with_progress(
            client,
            name,
            &secret,
            Duration::from_secs(10),
            move |d, t| sh.report(d, t),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        shown.finish();
        if !json {
            for l in &r.repaired {
                println!("REPAIRED {l}");
            }
            for l in &r.failed {
                println!("UNREPAIRED {l}");
            }
            for l in &r.unreachable {
                println!("UNREACHABLE {l}");
            }
            println!(
                "volume {name}: repair checked {} chunks, replaced {} copies, {} failures",
                r.chunks_checked,
                r.repaired.len(),
                r.failed.len()
            );
        }
        Some(r)
    } else {
        None
    };
    let shown = Shown::new(format!("verify {name}"));
    let sh = shown.clone();
    let (vol, report) = blockd::repair::verify_volume_with_progress(
        client,
        name,
        &secret,
        Duration::from_secs(10),
        Arc::new(move |d, t| sh.report(d, t)),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    shown.finish();
    let mut out_sets: std::collections::BTreeMap<&str, usize> = Default::default();
    for set in &vol.sets {
        for m in set.members.iter().filter(|m| !m.in_service) {
            *out_sets.entry(m.node.as_str()).or_default() += 1;
        }
    }
    let out_of_service: Vec<String> = out_sets
        .iter()
        .map(|(n, c)| {
            format!(
                "{n} is out of service in {c} of {} chunk sets",
                vol.sets.len()
            )
        })
        .collect();
    // A repair that left a chunk without a good copy fails the run even if the records agree.
    let bad = !report.differences.is_empty()
        || !report.unreachable.is_empty()
        || repaired
            .as_ref()
            .is_some_and(|r| !r.failed.is_empty() || !r.unreachable.is_empty());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "volume": vol.name,
                "chunks_compared": report.chunks_compared,
                "equal": !bad,
                "differences": report.differences,
                "unreachable": report.unreachable,
                "out_of_service": out_of_service,
                "repair": repaired,
            })
        );
    } else {
        for d in &report.differences {
            println!("DIFF {d}");
        }
        for u in &report.unreachable {
            println!("UNREACHABLE {u}");
        }
        for o in &out_of_service {
            println!("NOTE {o}");
        }
        if bad {
            println!(
                "volume {}: {} of {} chunks differ between replicas{}",
                vol.name,
                report.differences.len(),
                report.chunks_compared,
                if report.unreachable.is_empty() {
                    String::new()
                } else {
                    format!(", {} replica(s) unreachable", report.unreachable.len())
                }
            );
        } else {
            println!(
                "volume {}: all replicas equal ({} chunks compared)",
                vol.name, report.chunks_compared
            );
        }
    }
    Ok(if bad { 1 } else { 0 })
}
