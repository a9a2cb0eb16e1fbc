//! The volume-mgr process: graceful stop on SIGTERM even with long-polls pending, kill -9 under
//! concurrent writers loses no acknowledged volume, start-up refusals with a one-line reason.

mod common;

use common::{bin, free_port, start};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn register(c: &Client, url: &str, capacity: u64) {
    let r = c
        .put(format!("{url}/v1/nodes/n1"))
        .json(&json!({"address": "127.0.0.1:7800", "nbd_address": "", "disks": [{"path": "/d0", "capacity": capacity, "used": 0}]}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn sigterm_stops_at_once_even_with_a_long_poll_pending() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = start(dir.path(), &[]);
    let url = m.url.clone();
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        let r = common::client()
            .get(format!(
                "{url}/v1/volumes?after_revision=1000000&timeout_ms=60000"
            ))
            .send();
        (t.elapsed(), r.map(|r| r.status().as_u16()))
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    m.terminate();
    let status = m
        .wait_exit(Duration::from_secs(10))
        .expect("volume-mgr still running 10 s after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let (took, r) = watcher.join().unwrap();
    assert!(took < Duration::from_secs(5), "long-poll held for {took:?}");
    assert_eq!(
        r.unwrap(),
        200,
        "the pending long-poll gets the current list"
    );
}

#[test]
fn sigkill_under_concurrent_writers_loses_no_acknowledged_volume() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    {
        let mut m = start(dir.path(), &[]);
        register(&common::client(), &m.url, 1 << 50);
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (url, acked) = (m.url.clone(), acked.clone());
                std::thread::spawn(move || {
                    let c = common::client();
                    for i in 0.. {
                        let name = format!("w{w}-{i}");
                        let r = c
                            .post(format!("{url}/v1/volumes"))
                            .json(&json!({"name": name, "size": 1 << 20}))
                            .send();
                        let Ok(r) = r else { return }; // the manager died
                        if r.status().as_u16() != 201 {
                            return;
                        }
                        let Ok(v) = r.json::<Value>() else { return };
                        acked
                            .lock()
                            .unwrap()
                            .insert(name, v["id"].as_u64().unwrap());
                    }
                })
            })
            .collect();
        // Kill while the writers are mid-flight.
        let t = Instant::now();
        while acked.lock().unwrap().len() < 40 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        m.child.kill().unwrap();
        let _ = m.child.wait();
        for w in writers {
            w.join().unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40, "only {} acknowledged", acked.len());
    let m = start(dir.path(), &[]);
    let c = common::client();
    // Liveness is not persisted: the node beats again before new volumes are placed on it.
    register(&c, &m.url, 1 << 50);
    let l: Value = c
        .get(format!("{}/v1/volumes", m.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let have: HashMap<String, u64> = l["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["id"].as_u64().unwrap(),
            )
        })
        .collect();
    for (name, id) in &acked {
        assert_eq!(
            have.get(name),
            Some(id),
            "acknowledged {name} lost or changed"
        );
    }
    // Ids stay unique, and new ones come after every id ever handed out.
    let mut ids: Vec<u64> = have.values().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), have.len());
    let v: Value = c
        .post(format!("{}/v1/volumes", m.url))
        .json(&json!({"name": "after", "size": 4096}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(v["id"].as_u64().unwrap() > *ids.last().unwrap(), "{v}");
}

/// Runs volume-mgr expecting it to refuse to start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let last = err.trim_end().lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("volume-mgr: "), "{err}");
    last
}

#[test]
fn start_up_refusals_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(refused(&["--data-dir", d, "--store", "etcd"]).contains("needs --etcd-endpoints"));
    // Nothing listens there: refused within the store's timeout, in one line.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let t = std::time::Instant::now();
    let e = refused(&["--store", "etcd", "--etcd-endpoints", &dead]);
    assert!(e.contains("etcd") && t.elapsed().as_secs() < 20, "{e}");
    assert!(refused(&[]).contains("--data-dir"));
    assert!(refused(&["--data-dir", d, "--down-after", "soon"]).contains("down-after"));
    let cfg = dir.path().join("m.toml");
    std::fs::write(&cfg, "data-dir = \"/x\"\nbogus = 1\n").unwrap();
    assert!(refused(&["--config", cfg.to_str().unwrap()]).contains("unknown field"));
    // A second manager on the same state is refused (redb's file lock).
    let _m = start(dir.path(), &[]);
    let port = free_port().to_string();
    let e = refused(&["--data-dir", d, "--listen", &format!("127.0.0.1:{port}")]);
    assert!(e.contains("state.redb"), "{e}");
    // The port is taken.
    let e = refused(&[
        "--data-dir",
        dir.path().join("other").to_str().unwrap(),
        "--listen",
        _m.url.trim_start_matches("http://"),
    ]);
    assert!(e.contains("cannot listen"), "{e}");
}

#[test]
fn config_file_keys_apply_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, flag_port) = (free_port(), free_port());
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\ndata-dir = \"{}\"\ndefault-replicas = 1\noverconmit = 1\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    // (A typo in a key is refused, see above; fix it and go.)
    assert!(refused(&["--config", cfg.to_str().unwrap()]).contains("overconmit"));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("overconmit = 1", "overcommit = 0.5");
    std::fs::write(&cfg, text).unwrap();
    let child = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{flag_port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{flag_port}");
    // Killed on drop, also when an assertion fails.
    let _m = common::Mgr {
        child,
        url: url.clone(),
    };
    let t = Instant::now();
    while common::client()
        .get(format!("{url}/healthz"))
        .send()
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not on the flag's port"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(common::client()
        .get(format!("http://127.0.0.1:{file_port}/healthz"))
        .send()
        .is_err());
    assert!(dir.path().join("state/state.redb").exists());
    // overcommit 0.5 from the file: 1 GiB of disk takes 512 MiB of volumes, not more.
    let c = common::client();
    register(&c, &url, 1 << 30);
    let create = |size: u64| {
        c.post(format!("{url}/v1/volumes"))
            .json(&json!({"name": format!("v{size}"), "size": size}))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // default-replicas = 1 from the file: one registered node is enough.
    assert_eq!(create(512 << 20), 201);
    assert_eq!(create(4096), 507);
}
