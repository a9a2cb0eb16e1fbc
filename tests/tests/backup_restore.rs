//! `fabctl backup` / `fabctl restore`: the manager's state is lost (data directory wiped) and
//! restored from a backup while blockd keeps running: the volume written before the backup
//! reads back through a new lease whose epoch is above every epoch issued before, a volume
//! created after the backup is gone, new volume ids do not reuse old ones, and a restore over
//! existing state needs --force.

use fabric_tests::cluster::{http_get, Fabric};
use fabric_tests::{require, try_run, wait_for};
use std::process::Command;
use std::time::Duration;

fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(url);
    let (ok, out) = try_run(&mut c);
    (ok && !out.contains("failed") && !out.contains("error"), out)
}

#[test]
fn backup_then_restore_into_a_lost_manager() {
    require("qemu-io");
    let mut f = Fabric::start("1G");
    let dir = f.path().to_path_buf();
    f.create_volume("v1", "64M");
    let url = format!("nbd://127.0.0.1:{}/v1", f.nbd_port);
    let (ok, out) = qemu_io(&url, &["write -P 0x5a 0 8M", "write -P 0xa5 32M 1M"]);
    assert!(ok, "{out}\n{}", f.logs());
    f.fabctl_ok(&[
        "net",
        "create",
        "n",
        "--vni",
        "42",
        "--subnet",
        "192.0.2.0/24",
    ]);
    let before = f.json(&["volume", "show", "v1"]);
    let cluster = f.json(&["status"]);
    let epoch = f.json(&["volume", "show", "v1"])["lease"]["epoch"]
        .as_u64()
        .unwrap_or(0);
    assert!(epoch >= 1, "a lease after the writes: {before}");

    let file = dir.join("cluster.backup");
    let out = f.fabctl_ok(&["backup", file.to_str().unwrap()]);
    assert!(
        out.contains("backup of cluster") && out.contains("1 volumes"),
        "{out}"
    );
    let backup: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(backup["format"], "fabric-backup/1");

    // Written after the backup: lost by the restore.
    f.create_volume("v2", "16M");

    // Disaster: the manager's state is gone. A fresh manager has a new cluster id.
    f.kill_manager();
    std::fs::remove_dir_all(dir.join("manager")).unwrap();
    f.start_manager();
    let (ok, out) = f.fabctl(&["volume", "show", "v1"]);
    assert!(!ok, "fresh manager knows no volume: {out}");

    let out = f.fabctl_ok(&["restore", file.to_str().unwrap()]);
    assert!(out.contains("restored cluster"), "{out}");
    let vols = f.json(&["volume", "ls"]);
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, vec!["v1"], "{vols}");
    let nets = f.json(&["net", "ls"]);
    assert_eq!(nets.as_array().unwrap().len(), 1, "{nets}");
    let info = http_get(&f.manager_addr, "/v1/cluster").unwrap().1;
    assert!(
        info.contains(backup["cluster_id"].as_str().unwrap()),
        "cluster id restored: {info} vs {cluster}"
    );
    let restored_epoch = f.json(&["volume", "show", "v1"])["lease"]["epoch"]
        .as_u64()
        .unwrap();
    assert!(
        restored_epoch > epoch + 1000,
        "lease epoch moved past every epoch issued before: {epoch} -> {restored_epoch}"
    );

    // The data reads back through the restored manager (blockd re-registers and takes a new
    // lease above the old epochs).
    wait_for(
        "v1 readable after the restore",
        Duration::from_secs(60),
        || qemu_io(&url, &["read -P 0x5a 0 8M", "read -P 0xa5 32M 1M"]).0,
    );
    let (ok, out) = qemu_io(&url, &["write -P 0x11 4M 1M", "read -P 0x11 4M 1M"]);
    assert!(ok, "writes after the restore: {out}\n{}", f.logs());
    // A new volume does not reuse an id that may have chunks on the hosts (once blockd's
    // heartbeats reached the new manager).
    wait_for("n1 up at the new manager", Duration::from_secs(30), || {
        f.json(&["node", "ls"])
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["name"] == "n1" && n["state"] == "up"))
    });
    f.create_volume("v3", "16M");
    let v3 = f.json(&["volume", "show", "v3"]);
    let v1 = f.json(&["volume", "show", "v1"]);
    assert!(
        v3["id"].as_u64().unwrap() > v1["id"].as_u64().unwrap() + 1000,
        "{v3} {v1}"
    );

    // A restore over existing state is refused without --force, in one line.
    let (ok, out) = f.fabctl(&["restore", file.to_str().unwrap()]);
    assert!(
        !ok && out.contains("--force") && out.trim().lines().count() == 1,
        "{out}"
    );
    let out = f.fabctl_ok(&["restore", "--force", file.to_str().unwrap()]);
    assert!(
        out.contains("1 deleted") || out.contains("deleted"),
        "{out}"
    );
    let vols = f.json(&["volume", "ls"]);
    assert_eq!(vols.as_array().unwrap().len(), 1, "v3 gone: {vols}");

    // Bad files: one line, non-zero exit, nothing changed.
    let junk = dir.join("junk");
    std::fs::write(&junk, b"{\"format\":\"other\"}").unwrap();
    let (ok, out) = f.fabctl(&["restore", "--force", junk.to_str().unwrap()]);
    assert!(!ok && out.contains("not a fabctl backup"), "{out}");
    let (ok, out) = f.fabctl(&["restore", dir.join("missing").to_str().unwrap()]);
    assert!(!ok && out.contains("missing"), "{out}");
    let mut bad = backup.clone();
    bad["objects"][0]["kind"] = "bogus".into();
    std::fs::write(&junk, serde_json::to_vec(&bad).unwrap()).unwrap();
    let (ok, out) = f.fabctl(&["restore", "--force", junk.to_str().unwrap()]);
    assert!(!ok && out.contains("unknown kind"), "{out}");
    assert_eq!(f.json(&["volume", "ls"]).as_array().unwrap().len(), 1);
}
