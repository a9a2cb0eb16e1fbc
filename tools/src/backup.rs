//! `fabctl backup FILE` and `fabctl restore FILE`: the whole cluster state to and from a file.

use anyhow::{bail, Context};
use std::io::Write;
use volume_mgr::api;
use volume_mgr::client::Client;

/// Counts of the objects a backup holds, by kind, for the summary line.
fn summary(b: &api::Backup) -> String {
    let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
    for o in &b.objects {
        *by.entry(o.kind.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = ["volume", "node", "network", "port", "vip"]
        .iter()
        .map(|k| format!("{} {k}s", by.get(k).copied().unwrap_or(0)))
        .collect();
    format!("{} objects ({})", b.objects.len(), parts.join(", "))
}

pub async fn backup(client: &Client, file: &str, json: bool) -> anyhow::Result<()> {
    let b = client.backup().await?;
    let text = serde_json::to_vec_pretty(&b)?;
    if file == "-" {
        let mut out = std::io::stdout().lock();
        out.write_all(&text)?;
        out.write_all(b"\n")?;
        return Ok(());
    }
    // Written beside the target, synced, then renamed: a crash leaves the old file or the new
    // one, never half of one.
    let path = std::path::Path::new(file);
    let tmp = path.with_extension("fabric-backup-tmp");
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
        f.write_all(&text)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .with_context(|| format!("{}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| file.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::json!({"file": file, "cluster_id": b.cluster_id, "revision": b.revision, "objects": b.objects.len()})
        );
    } else {
        println!(
            "backup of cluster {} at revision {}: {} written to {file}",
            b.cluster_id,
            b.revision,
            summary(&b)
        );
    }
    Ok(())
}

pub async fn restore(client: &Client, file: &str, force: bool, json: bool) -> anyhow::Result<()> {
    let text = if file == "-" {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut s)?;
        s
    } else {
        std::fs::read(file).with_context(|| file.to_string())?
    };
    let b: api::Backup =
        serde_json::from_slice(&text).with_context(|| format!("{file} is not a fabctl backup"))?;
    if b.format != api::BACKUP_FORMAT {
        bail!(
            "{file}: backup format {:?}, this fabctl reads {:?}",
            b.format,
            api::BACKUP_FORMAT
        );
    }
    let r = client.restore(&b, force).await?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "restored cluster {} from {file} (taken at revision {}): {} objects written, {} deleted, {} lease epochs moved up; now at revision {}",
            r.cluster_id, b.revision, r.restored, r.deleted, r.leases_bumped, r.revision
        );
    }
    Ok(())
}
