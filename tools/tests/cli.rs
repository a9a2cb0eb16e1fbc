//! `fabctl volume|node|disk …` as scripts and operators run it: the real fabctl binary against
//! a real volume-mgr process. Tables by default, `-o json` for scripts, and every failure is
//! exit 1 with one line `fabctl: reason` (usage errors: exit 2, as clap does).
//!
//! Which volume-mgr: the binary next to fabctl in the target directory. `cargo test` over the
//! workspace (what `tests/run` and CI do) builds every workspace binary first, so it is there
//! and fresh. `cargo test -p tools` alone builds only tools' binaries (checked with
//! `--message-format=json`: no volume-mgr artifact); then, if no volume-mgr binary is there
//! from an earlier build, the test runs the manager in-process (`volume_mgr::serve`, the same
//! code `fabctl up` runs) and says so on stderr (`FABRIC_TEST_MANAGER=in-process` forces
//! that). A binary left by an earlier build may be older than the library; run the workspace
//! tests after changing volume-mgr.

mod common;

use common::*;
use std::process::Command;
use volume_mgr::api;

/// Registers node `name` with one disk of `capacity` bytes, as blockd would.
fn register(m: &Mgr, name: &str, capacity: u64) {
    let c = volume_mgr::client::Client::new(vec![m.url.clone()]);
    let req = api::RegisterNode {
        address: "127.0.0.1:7800".into(),
        nbd_address: "127.0.0.1:10809".into(),
        nbd_socket: None,
        zone: Some("rack1".into()),
        disks: vec![api::DiskSpec {
            path: format!("/srv/{name}/disk0.img"),
            capacity,
            used: 3 << 30,
        }],
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(c.register_node(name, &req))
        .unwrap();
}

#[test]
fn volumes_nodes_and_disks() {
    let m = start_manager();
    // An empty cluster: tables have their headers, JSON is an empty list.
    assert_eq!(
        ok(&m, &["volume", "ls"]).trim(),
        "NAME  ID  SIZE  REPLICAS  CHUNK"
    );
    assert_eq!(json(&m, &["node", "ls"]), serde_json::json!([]));
    register(&m, "host-a", 1 << 40);
    register(&m, "b", 1 << 40);

    let nodes = ok(&m, &["node", "ls"]);
    assert!(nodes.starts_with("NAME"), "{nodes}");
    assert_aligned(
        &nodes,
        &["host-a", "up", "rack1", "127.0.0.1:7800", "127.0.0.1:10809"],
    );
    assert_aligned(&nodes, &["b ", "up", "rack1"]);
    let n = json(&m, &["node", "ls"]);
    assert_eq!(n[1]["name"], "host-a");
    assert_eq!(n[1]["state"], "up");
    let disks = ok(&m, &["disk", "ls"]);
    assert_aligned(
        &disks,
        &["host-a", "/srv/host-a/disk0.img", "1 TiB", "3 GiB", "0.3%"],
    );
    let d = json(&m, &["disk", "ls"]);
    assert_eq!(d[0]["capacity"], 1u64 << 40);

    // Create, in the sizes operators type.
    for (name, size, bytes, human) in [
        ("vm1", "10G", 10u64 << 30, "10 GiB"),
        ("vm2", "1.5G", 3 << 29, "1.5 GiB"),
        ("scratch", "512M", 512 << 20, "512 MiB"),
        ("tiny", "4096", 4096, "4 KiB"),
        ("big", "1T", 1 << 40, "1 TiB"),
    ] {
        let out = ok(&m, &["volume", "create", name, "--size", size]);
        assert!(
            out.starts_with(&format!("created volume {name} ({human}, id ")),
            "{out}"
        );
        assert_eq!(json(&m, &["volume", "show", name])["size"], bytes);
    }
    let v = json(&m, &["volume", "create", "j", "--size", "8M"]);
    assert_eq!(
        (v["name"].clone(), v["size"].clone(), v["id"].clone()),
        (
            serde_json::json!("j"),
            serde_json::json!(8 << 20),
            serde_json::json!(6)
        )
    );
    assert_eq!(v["chunk_size"], api::DEFAULT_CHUNK_SIZE);

    let table = ok(&m, &["volume", "ls"]);
    assert_eq!(table.lines().count(), 7, "{table}");
    assert_aligned(&table, &["NAME", "ID", "SIZE", "REPLICAS", "CHUNK"]);
    assert_aligned(&table, &["scratch", "3", "512 MiB", "1", "4 MiB"]);
    assert_aligned(&table, &["vm2", "2", "1.5 GiB", "1", "4 MiB"]);
    let ls = json(&m, &["volume", "ls"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big", "j", "scratch", "tiny", "vm1", "vm2"]);

    let show = ok(&m, &["volume", "show", "vm1"]);
    assert!(show.contains("10 GiB (10737418240 bytes)"), "{show}");
    assert!(show.contains("chunks       2560"), "{show}");
    assert!(show.contains("lease        none\n"), "{show}");
    assert!(show.contains("chunk sets   32\n"), "{show}");
    // The replicas: one row per node and state, with the chunk sets it holds.
    let replicas = show.split("\n\n").nth(1).unwrap_or_default();
    assert_aligned(replicas, &["SETS", "NODE", "ZONE", "STATE", "NODE-STATE"]);
    // One replica per chunk set, spread over both nodes by their free space.
    assert_eq!(replicas.lines().count(), 3, "{show}");
    let row = replicas.lines().find(|l| l.contains("host-a")).unwrap();
    assert!(row.contains("  host-a  rack1  in-service  up"), "{show}");
    // -o json is the API's JSON plus the lease.
    let mut jv = json(&m, &["volume", "show", "vm1"]);
    assert!(jv["lease"].is_null());
    jv.as_object_mut().unwrap().remove("lease");
    let api_v: api::Volume = serde_json::from_value(jv).unwrap();
    assert_eq!(api_v.sets.len(), 32);
    assert_eq!((api_v.name.as_str(), api_v.id), ("vm1", 1));

    assert_eq!(ok(&m, &["volume", "rm", "vm1"]), "deleted volume vm1\n");
    assert_eq!(
        json(&m, &["volume", "rm", "vm2"]),
        serde_json::json!({"deleted": "vm2"})
    );
    let e = fails(fabctl(&m, &["volume", "show", "vm1"]));
    assert_eq!(e, "fabctl: volume vm1 not found (not_found, HTTP 404)");
    // Ids are never reused.
    assert_eq!(
        json(&m, &["volume", "create", "vm1", "--size", "1G"])["id"],
        7
    );
}

/// Registers `name` in `zone` with one empty disk of `capacity` bytes.
fn register_in(m: &Mgr, name: &str, zone: &str, capacity: u64) {
    let c = volume_mgr::client::Client::new(vec![m.url.clone()]);
    let req = api::RegisterNode {
        address: "127.0.0.1:7800".into(),
        nbd_address: "127.0.0.1:10809".into(),
        nbd_socket: None,
        zone: Some(zone.into()),
        disks: vec![api::DiskSpec {
            path: "/d0".into(),
            capacity,
            used: 0,
        }],
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(c.register_node(name, &req))
        .unwrap();
}

#[test]
fn replicated_volumes() {
    let m = start_manager(); // --default-replicas 1
    register_in(&m, "h1", "z1", 1 << 40);
    register_in(&m, "h2", "z2", 1 << 40);
    // Two zones cannot hold three replicas: one line with the reason.
    let e = fails(fabctl(
        &m,
        &["volume", "create", "r3", "--size", "1G", "--replicas", "3"],
    ));
    assert_eq!(
        e,
        "fabctl: need 3 failure domains (zones) with free capacity for 3 replicas, only 2 available: z1 (h1), z2 (h2) (no_capacity, HTTP 507)"
    );
    for (args, want) in [
        (&["--replicas", "0"][..], "replicas must be 1 to 16, got 0"),
        (&["--replicas", "17"], "replicas must be 1 to 16, got 17"),
        (
            &["--replicas", "2", "--min-replicas", "3"],
            "min_replicas must be 1 to replicas (2), got 3",
        ),
    ] {
        let mut a = vec!["volume", "create", "r3", "--size", "1G"];
        a.extend_from_slice(args);
        let e = fails(fabctl(&m, &a));
        assert!(e.contains(want) && e.contains("invalid_argument"), "{e}");
    }
    register_in(&m, "h3", "z3", 1 << 40);
    let out = ok(
        &m,
        &["volume", "create", "r3", "--size", "1G", "--replicas", "3"],
    );
    assert_eq!(
        out,
        "created volume r3 (1 GiB, id 1, 3 replicas on h1, h2, h3)\n"
    );
    let v = json(
        &m,
        &[
            "volume",
            "create",
            "r2",
            "--size",
            "8M",
            "--replicas",
            "2",
            "--min-replicas",
            "1",
        ],
    );
    assert_eq!(
        (v["replicas"].clone(), v["min_replicas"].clone()),
        (2.into(), 1.into())
    );
    ok(&m, &["volume", "create", "r1", "--size", "8M"]);
    // ls: the REPLICAS column.
    let table = ok(&m, &["volume", "ls"]);
    assert_aligned(&table, &["r1", "3", "8 MiB", "1", "4 MiB"]);
    assert_aligned(&table, &["r2", "2", "8 MiB", "2", "4 MiB"]);
    assert_aligned(&table, &["r3", "1", "1 GiB", "3", "4 MiB"]);

    // show: the header, then one row per node (every set on every node, all in service).
    let show = ok(&m, &["volume", "show", "r3"]);
    for line in [
        "name         r3\n",
        "replicas     3\n",
        "min replicas 2\n",
        "lease        none\n",
        "chunk sets   32\n",
    ] {
        assert!(show.contains(line), "{line:?} in\n{show}");
    }
    let replicas = show.split("\n\n").nth(1).unwrap();
    assert_eq!(
        replicas,
        "SETS    NODE  ZONE  STATE       NODE-STATE\n\
         all 32  h1    z1    in-service  up\n\
         all 32  h2    z2    in-service  up\n\
         all 32  h3    z3    in-service  up\n"
    );
    // The lease holder records h2 out of service in two sets: those rows split out.
    let c = volume_mgr::client::Client::new(vec![m.url.clone()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lease = rt.block_on(c.acquire_lease("r3", "h1")).unwrap();
    rt.block_on(c.update_replicas(
        "r3",
        &api::ReplicaUpdate {
            epoch: lease.epoch,
            node: "h2".into(),
            in_service: false,
            sets: Some(vec![0, 5]),
        },
    ))
    .unwrap();
    let show = ok(&m, &["volume", "show", "r3"]);
    assert!(show.contains("lease        h1 (epoch 1)\n"), "{show}");
    let replicas = show.split("\n\n").nth(1).unwrap();
    assert_eq!(
        replicas,
        "SETS      NODE  ZONE  STATE           NODE-STATE\n\
         all 32    h1    z1    in-service      up\n\
         1-4,6-31  h2    z2    in-service      up\n\
         0,5       h2    z2    out-of-service  up\n\
         all 32    h3    z3    in-service      up\n"
    );
    // -o json: the API's Volume plus the lease.
    let mut jv = json(&m, &["volume", "show", "r3"]);
    assert_eq!(jv["lease"]["holder"], "h1");
    assert_eq!(jv["lease"]["epoch"], 1);
    jv.as_object_mut().unwrap().remove("lease");
    let v: api::Volume = serde_json::from_value(jv).unwrap();
    assert_eq!(v, rt.block_on(c.get_volume("r3")).unwrap());
    assert_eq!(v.sets.len(), 32);
    assert!(
        !v.sets[5]
            .members
            .iter()
            .find(|m| m.node == "h2")
            .unwrap()
            .in_service
    );
}

#[test]
fn every_failure_is_exit_1_and_one_line() {
    let m = start_manager();
    // No disks yet.
    let e = fails(fabctl(&m, &["volume", "create", "a", "--size", "1G"]));
    assert!(e.contains("no_capacity"), "{e}");
    register(&m, "n1", 4 << 30);
    ok(&m, &["volume", "create", "a", "--size", "1G"]);
    for (args, want) in [
        (
            &["volume", "create", "a", "--size", "1G"][..],
            "already exists",
        ),
        (&["volume", "create", "b", "--size", "4G"], "no capacity"),
        (
            &["volume", "create", "b", "--size", "1000"],
            "multiple of 4096",
        ),
        (
            &["volume", "create", "b", "--size", "0"],
            "multiple of 4096",
        ),
        (&["volume", "create", "b", "--size", "2P"], "1 PiB"),
        (
            &["volume", "create", "b", "--size", "lots"],
            "invalid size \"lots\"",
        ),
        (&["volume", "create", "b", "--size", "10GB"], "ambiguous"),
        (&["volume", "create", "b", "--size", "1.3K"], "whole number"),
        (&["volume", "create", "b/c", "--size", "1G"], "allowed: A-Z"),
        (
            &["volume", "create", "-o", "json", ".x", "--size", "1G"],
            "must not start",
        ),
        (&["volume", "show", "nope"], "volume nope not found"),
        (&["volume", "rm", "nope"], "volume nope not found"),
        (&["volume", "show", "a/b"], "not found"),
    ] {
        let e = fails(fabctl(&m, args));
        assert!(e.contains(want), "fabctl {args:?}: {e}");
    }
    // Nothing half-made.
    assert_eq!(json(&m, &["volume", "ls"]).as_array().unwrap().len(), 1);

    // The manager is unreachable or misnamed.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let run = |manager: &str, args: &[&str]| {
        Command::new(fabctl_bin())
            .env_remove("FABRIC_MANAGER")
            .args(["--manager", manager])
            .args(args)
            .output()
            .unwrap()
    };
    let e = fails(run(&dead, &["volume", "ls"]));
    assert!(
        e.starts_with(&format!("fabctl: cannot reach volume-mgr at {dead}: ")),
        "{e}"
    );
    let e = fails(run("localhost:7700", &["node", "ls"]));
    assert!(e.contains("expected http://HOST:PORT"), "{e}");
}

#[test]
fn manager_from_env_flag_wins_and_default() {
    let m = start_manager();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let o = Command::new(fabctl_bin())
        .env("FABRIC_MANAGER", &m.url)
        .args(["volume", "ls"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(fabctl_bin())
        .env("FABRIC_MANAGER", &m.url)
        .args(["--manager", &dead, "volume", "ls"])
        .output()
        .unwrap();
    assert!(fails(o).contains(&dead));
    // Without either: http://127.0.0.1:7700 (if something else listens there, fine; if not,
    // the reason names the default URL).
    let o = Command::new(fabctl_bin())
        .env_remove("FABRIC_MANAGER")
        .args(["volume", "ls"])
        .output()
        .unwrap();
    if !o.status.success() {
        assert!(fails(o).contains("http://127.0.0.1:7700"));
    }
    let o = Command::new(fabctl_bin())
        .env_remove("FABRIC_MANAGER")
        .args(["--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(
        help.contains("http://127.0.0.1:7700") && help.contains("FABRIC_MANAGER"),
        "{help}"
    );
}

#[test]
fn usage_errors_are_exit_2() {
    for args in [
        &["volume"][..],
        &["volume", "create", "a"],
        &["volume", "create", "--size", "1G"],
        &["volume", "frobnicate"],
        &["-o", "yaml", "volume", "ls"],
        &["node", "ls", "extra"],
        &[],
    ] {
        let o = Command::new(fabctl_bin())
            .env_remove("FABRIC_MANAGER")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "fabctl {args:?}");
    }
    // Help documents the binary units.
    let o = Command::new(fabctl_bin())
        .args(["volume", "create", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(help.contains("K = 1024"), "{help}");
}
