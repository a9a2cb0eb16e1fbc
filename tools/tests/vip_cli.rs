//! `fabctl vip …` as operators and scripts run it: the real fabctl binary against a real
//! volume-mgr (see cli.rs for which one). lb-vip instances are played by the client library
//! (status reports), as the lb-vip daemon does it.

mod common;

use common::*;
use serde_json::json;
use std::process::Command;
use volume_mgr::api;
use volume_mgr::client::Client;

fn report(m: &Mgr, vip: &str, node: &str, r: api::VipReport) {
    let c = Client::new(vec![m.url.clone()]);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(c.report_vip(vip, node, &r))
        .unwrap();
}

fn stats(addr: &str, healthy: bool, active: u64) -> api::BackendStats {
    api::BackendStats {
        addr: addr.into(),
        healthy,
        active_conns: active,
        total_conns: 100 + active,
        bytes_in: 2048,
        bytes_out: 1 << 20,
        health_transitions: 1,
        errors: 0,
    }
}

/// The value of a `key value` line of `vip show`.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in\n{out}"))[key.len()..]
        .trim()
        .to_string()
}

#[test]
fn vips_and_backends() {
    let m = start_manager();
    // Empty: headers only; JSON is an empty list.
    assert_eq!(
        ok(&m, &["vip", "ls"]).trim(),
        "NAME  ADDR  PROTO  ALGO  BACKENDS  HOLDER"
    );
    assert_eq!(json(&m, &["vip", "ls"]), json!([]));

    // Create: defaults, and every flag.
    assert_eq!(
        ok(
            &m,
            &[
                "vip",
                "create",
                "web",
                "--addr",
                "192.0.2.10:80",
                "--proto",
                "tcp"
            ]
        ),
        "created vip web (tcp 192.0.2.10:80, algo rr, check tcp)\n"
    );
    let dns = json(
        &m,
        &[
            "vip",
            "create",
            "dns",
            "--addr",
            "192.0.2.10:53",
            "--proto",
            "udp",
            "--algo",
            "source-hash",
            "--persist",
            "300",
            "--drain",
            "5",
            "--check",
            "http:/healthz:204",
            "--check-interval",
            "500ms",
            "--check-timeout",
            "200ms",
            "--rise",
            "1",
            "--fall",
            "4",
            "--proxy-protocol",
            "--maglev-table-size",
            "251",
        ],
    );
    let dns: api::Vip = serde_json::from_value(dns).unwrap();
    assert_eq!(
        (dns.proto, dns.algo),
        (api::VipProto::Udp, api::VipAlgo::SourceHash)
    );
    assert_eq!((dns.persist_secs, dns.drain_secs), (300, 5));
    assert_eq!(
        dns.check,
        api::HealthCheck {
            kind: api::CheckKind::Http,
            http_path: Some("/healthz".into()),
            http_status: Some(204),
            interval_ms: 500,
            timeout_ms: 200,
            rise: 1,
            fall: 4,
        }
    );
    assert!(dns.proxy_protocol);
    assert_eq!(dns.maglev_table_size, 251);
    // Only some check flags: a TCP check with those over the defaults.
    let v = json(
        &m,
        &[
            "vip",
            "create",
            "ssh",
            "--addr",
            "[2001:db8::1]:22",
            "--proto",
            "tcp",
            "--algo",
            "maglev",
            "--fall",
            "5",
        ],
    );
    assert_eq!(
        (
            &v["addr"],
            &v["check"]["kind"],
            &v["check"]["fall"],
            &v["check"]["rise"]
        ),
        (
            &json!("[2001:db8::1]:22"),
            &json!("tcp"),
            &json!(5),
            &json!(2)
        )
    );

    // Backends.
    assert_eq!(
        ok(&m, &["vip", "backend", "add", "web", "10.0.0.1:8080"]),
        "added backend 10.0.0.1:8080 to vip web (weight 1)\n"
    );
    assert_eq!(
        ok(
            &m,
            &[
                "vip",
                "backend",
                "add",
                "web",
                "10.0.0.2:8080",
                "--weight",
                "3",
                "--max-conns",
                "100"
            ]
        ),
        "added backend 10.0.0.2:8080 to vip web (weight 3, at most 100 connections)\n"
    );
    let v = json(&m, &["vip", "backend", "add", "web", "10.0.0.3:8080"]);
    assert_eq!(v["backends"].as_array().unwrap().len(), 3);

    let ls = ok(&m, &["vip", "ls"]);
    assert_aligned(
        &ls,
        &["NAME", "ADDR", "PROTO", "ALGO", "BACKENDS", "HOLDER"],
    );
    assert_aligned(&ls, &["web ", "192.0.2.10:80", "tcp", "rr", "3", "-"]);
    assert_aligned(
        &ls,
        &["dns", "192.0.2.10:53", "udp", "source-hash", "0", "-"],
    );
    assert_aligned(&ls, &["ssh", "[2001:db8::1]:22", "tcp", "maglev", "0", "-"]);

    // Show before any instance reported.
    let show = ok(&m, &["vip", "show", "web"]);
    assert_eq!(field(&show, "addr"), "192.0.2.10:80");
    assert_eq!(field(&show, "network"), "- (host)");
    assert_eq!(field(&show, "algo"), "rr");
    assert_eq!(field(&show, "persist"), "off");
    assert_eq!(field(&show, "drain"), "30s");
    assert_eq!(
        field(&show, "check"),
        "tcp every 2s, timeout 1s, rise 2, fall 3"
    );
    assert_eq!(field(&show, "proxy proto"), "off");
    assert_eq!(field(&show, "reports"), "no reports yet");
    let table = &show[show.find("BACKEND ").unwrap()..];
    assert_aligned(
        table,
        &[
            "BACKEND", "WEIGHT", "STATE", "HEALTH", "ACTIVE", "TOTAL", "BYTES",
        ],
    );
    assert_aligned(table, &["10.0.0.1:8080", "1", "active", "-", "-", "-", "-"]);
    assert_aligned(table, &["10.0.0.2:8080", "3", "active", "-", "-", "-", "-"]);
    let dshow = ok(&m, &["vip", "show", "dns"]);
    assert_eq!(
        field(&dshow, "check"),
        "http:/healthz:204 every 500ms, timeout 200ms, rise 1, fall 4"
    );
    assert_eq!(field(&dshow, "persist"), "300s");
    assert_eq!(field(&dshow, "proxy proto"), "v2");
    assert!(dshow.trim_end().ends_with("no backends"), "{dshow}");

    // Drain and remove.
    assert_eq!(
        ok(&m, &["vip", "backend", "drain", "web", "10.0.0.2:8080"]),
        "draining backend 10.0.0.2:8080 of vip web: no new connections, established ones may go on for 30s\n"
    );
    assert_eq!(
        ok(&m, &["vip", "backend", "rm", "web", "10.0.0.3:8080"]),
        "removed backend 10.0.0.3:8080 from vip web (its connections may go on for 30s)\n"
    );
    let v = json(&m, &["vip", "show", "web"]);
    assert_eq!(v["backends"][1]["state"], "draining");
    assert_eq!(v["backends"].as_array().unwrap().len(), 2);
    assert_aligned(
        &ok(&m, &["vip", "ls"]),
        &["web ", "192.0.2.10:80", "tcp", "rr", "2 (1 draining)", "-"],
    );

    // Reports from two instances: health, connections and bytes summed; the holder.
    report(
        &m,
        "web",
        "host-a",
        api::VipReport {
            holder: true,
            backends: vec![
                stats("10.0.0.1:8080", true, 4),
                stats("10.0.0.2:8080", false, 1),
                stats("10.0.0.3:8080", true, 2),
            ],
        },
    );
    report(
        &m,
        "web",
        "host-b",
        api::VipReport {
            holder: false,
            backends: vec![
                stats("10.0.0.1:8080", true, 1),
                stats("10.0.0.2:8080", true, 0),
            ],
        },
    );
    let show = ok(&m, &["vip", "show", "web"]);
    assert_eq!(field(&show, "holder"), "host-a");
    assert_eq!(field(&show, "reports"), "host-a, host-b");
    let table = &show[show.find("BACKEND ").unwrap()..];
    assert_aligned(
        table,
        &[
            "10.0.0.1:8080",
            "1",
            "active",
            "up",
            "5",
            "205",
            "4 KiB/2 MiB",
        ],
    );
    assert_aligned(
        table,
        &[
            "10.0.0.2:8080",
            "3",
            "draining (",
            "up on 1/2",
            "1",
            "201",
            "4 KiB/2 MiB",
        ],
    );
    assert_aligned(
        table,
        &[
            "10.0.0.3:8080",
            "-",
            "removed",
            "up",
            "2",
            "102",
            "2 KiB/1 MiB",
        ],
    );
    assert_aligned(
        &ok(&m, &["vip", "ls"]),
        &[
            "web ",
            "192.0.2.10:80",
            "tcp",
            "rr",
            "2 (1 draining)",
            "host-a",
        ],
    );
    let j = json(&m, &["vip", "show", "web"]);
    assert_eq!(j["reports"]["host-a"]["holder"], true);
    assert_eq!(j["reports"]["host-b"]["backends"][0]["active_conns"], 1);

    // Delete.
    assert_eq!(ok(&m, &["vip", "rm", "ssh"]), "deleted vip ssh\n");
    assert_eq!(json(&m, &["vip", "rm", "dns"]), json!({"deleted": "dns"}));
    let names: Vec<String> = json(&m, &["vip", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["web"]);
}

#[test]
fn vip_errors_are_one_line() {
    let m = start_manager();
    ok(
        &m,
        &[
            "vip",
            "create",
            "web",
            "--addr",
            "192.0.2.10:80",
            "--proto",
            "tcp",
        ],
    );
    ok(&m, &["vip", "backend", "add", "web", "10.0.0.1:80"]);
    fn create<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["vip", "create"];
        a.extend_from_slice(extra);
        a
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            create(&["w2", "--addr", "192.0.2.10:0", "--proto", "tcp"]),
            "fabctl: addr 192.0.2.10:0 has port 0: give the port it listens on (1 to 65535) (invalid_argument, HTTP 400)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.10", "--proto", "tcp"]),
            "fabctl: addr \"192.0.2.10\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80) (invalid_argument, HTTP 400)",
        ),
        (
            create(&["web", "--addr", "192.0.2.11:80", "--proto", "tcp"]),
            "fabctl: vip web already exists (already_exists, HTTP 409)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.10:80", "--proto", "tcp"]),
            "fabctl: tcp 192.0.2.10:80 is already served by vip web (in_use, HTTP 409)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--net", "nope"]),
            "fabctl: network nope does not exist (invalid_argument, HTTP 400)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--persist", "86401"]),
            "fabctl: persist_secs 86401 is out of range: must be 0 to 86400 seconds (invalid_argument, HTTP 400)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--drain", "90000"]),
            "fabctl: drain_secs 90000 is out of range: must be 0 to 86400 seconds (invalid_argument, HTTP 400)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--maglev-table-size", "100"]),
            "fabctl: maglev_table_size 100 is not a prime from 7 to 1048573 (default 65537) (invalid_argument, HTTP 400)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--check", "icmp"]),
            "fabctl: --check: check \"icmp\" is not tcp or http:/PATH[:STATUS] (e.g. http:/healthz:200)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--check", "http:healthz"]),
            "fabctl: --check: check \"http:healthz\" is not tcp or http:/PATH[:STATUS] (e.g. http:/healthz:200)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--check-interval", "soon"]),
            "fabctl: --check-interval \"soon\": expected a duration like 2s, 500ms or 1m",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--check-timeout", "3s"]),
            "fabctl: check timeout_ms 3000 is out of range: must be 10 to the interval (2000 ms) (invalid_argument, HTTP 400)",
        ),
        (
            create(&["w2", "--addr", "192.0.2.11:80", "--proto", "tcp", "--rise", "0"]),
            "fabctl: check rise 0 is out of range: must be 1 to 100 (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "backend", "add", "web", "10.0.0.1:80"],
            "fabctl: backend 10.0.0.1:80 is already in vip web (active) (already_exists, HTTP 409)",
        ),
        (
            vec!["vip", "backend", "add", "web", "10.0.0.2:80", "--weight", "0"],
            "fabctl: weight 0 is out of range: must be 1 to 256 (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "backend", "add", "web", "10.0.0.2:80", "--weight", "257"],
            "fabctl: weight 257 is out of range: must be 1 to 256 (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "backend", "add", "web", "10.0.0.2:80", "--max-conns", "0"],
            "fabctl: max_conns must be at least 1 (leave it out for no limit) (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "backend", "add", "web", "10.0.0.2:0"],
            "fabctl: backend 10.0.0.2:0 has port 0: give the port it listens on (1 to 65535) (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "backend", "add", "web", "backend-host:80"],
            "fabctl: backend \"backend-host:80\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80) (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "backend", "add", "nope", "10.0.0.2:80"],
            "fabctl: vip nope not found (not_found, HTTP 404)",
        ),
        (
            vec!["vip", "backend", "rm", "web", "10.0.0.9:80"],
            "fabctl: backend 10.0.0.9:80 is not in vip web (not_found, HTTP 404)",
        ),
        (
            vec!["vip", "backend", "drain", "web", "10.0.0.9:80"],
            "fabctl: backend 10.0.0.9:80 is not in vip web (not_found, HTTP 404)",
        ),
        (
            vec!["vip", "backend", "drain", "web", "10.0.0.9"],
            "fabctl: backend \"10.0.0.9\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80) (invalid_argument, HTTP 400)",
        ),
        (
            vec!["vip", "show", "nope"],
            "fabctl: vip nope not found (not_found, HTTP 404)",
        ),
        (
            vec!["vip", "rm", "nope"],
            "fabctl: vip nope not found (not_found, HTTP 404)",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(fails(fabctl(&m, &args)), want, "fabctl {args:?}");
    }
    // Nothing half-made.
    let vs = json(&m, &["vip", "ls"]);
    assert_eq!(vs.as_array().unwrap().len(), 1);
    assert_eq!(vs[0]["backends"].as_array().unwrap().len(), 1);
    // The manager is unreachable.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let o = Command::new(fabctl_bin())
        .env_remove("FABRIC_MANAGER")
        .args(["--manager", &dead, "vip", "ls"])
        .output()
        .unwrap();
    let e = fails(o);
    assert!(
        e.starts_with(&format!("fabctl: cannot reach volume-mgr at {dead}: ")),
        "{e}"
    );
}

#[test]
fn vip_usage_errors_are_exit_2() {
    for args in [
        &["vip"][..],
        &["vip", "create", "w", "--proto", "tcp"],
        &["vip", "create", "w", "--addr", "192.0.2.1:80"],
        &[
            "vip",
            "create",
            "w",
            "--addr",
            "192.0.2.1:80",
            "--proto",
            "sctp",
        ],
        &[
            "vip",
            "create",
            "w",
            "--addr",
            "192.0.2.1:80",
            "--proto",
            "tcp",
            "--algo",
            "random",
        ],
        &[
            "vip",
            "create",
            "w",
            "--addr",
            "192.0.2.1:80",
            "--proto",
            "tcp",
            "--algo",
            "source_hash",
        ],
        &[
            "vip",
            "create",
            "w",
            "--addr",
            "192.0.2.1:80",
            "--proto",
            "tcp",
            "--persist",
            "-1",
        ],
        &[
            "vip",
            "create",
            "w",
            "--addr",
            "192.0.2.1:80",
            "--proto",
            "tcp",
            "--proxy-protocol",
            "yes",
        ],
        &["vip", "backend", "add", "web"],
        &[
            "vip",
            "backend",
            "add",
            "web",
            "10.0.0.1:80",
            "--weight",
            "-1",
        ],
        &["vip", "backend", "list", "web"],
        &["vip", "ls", "extra"],
    ] {
        let o = Command::new(fabctl_bin())
            .env_remove("FABRIC_MANAGER")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "fabctl {args:?}");
    }
    let o = Command::new(fabctl_bin())
        .args(["vip", "create", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    for word in [
        "source-hash",
        "maglev",
        "p2c",
        "http:/PATH[:STATUS]",
        "--proxy-protocol",
    ] {
        assert!(help.contains(word), "{word} not in\n{help}");
    }
}
