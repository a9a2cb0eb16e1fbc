//! `fabctl vip …`: load-balanced virtual IPs, their backends, and what the lb-vip instances
//! report about them.

use crate::{ago, human, print_json, table};
use clap::{Subcommand, ValueEnum};
use volume_mgr::api;
use volume_mgr::client::Client;

#[derive(Subcommand, Debug)]
pub enum VipCmd {
    /// Create a VIP: one address spread over backends by lb-vip.
    Create {
        name: String,
        /// The address clients connect to: IP:PORT (IPv6 as [ADDR]:PORT), port not 0.
        #[arg(long)]
        addr: String,
        #[arg(long, value_enum)]
        proto: ProtoArg,
        /// An overlay network the VIP is reachable on (its address then lies in the subnet).
        #[arg(long)]
        net: Option<String>,
        /// Scheduling algorithm [default: rr].
        #[arg(long, value_enum)]
        algo: Option<AlgoArg>,
        /// Keep a client IP on the same backend for this many seconds (0-86400; 0 = off).
        #[arg(long, value_name = "SECONDS")]
        persist: Option<u32>,
        /// Established connections of a drained or removed backend may go on this long
        /// (0-86400) [default: 30].
        #[arg(long, value_name = "SECONDS")]
        drain: Option<u32>,
        /// Health check: tcp (connect), or http:/PATH[:STATUS] (GET PATH answered with
        /// STATUS, default 200) [default: tcp].
        #[arg(long, value_name = "tcp|http:/PATH[:STATUS]")]
        check: Option<String>,
        /// Time between checks of a backend: 2s, 500ms, 1m [default: 2s].
        #[arg(long, value_name = "DURATION")]
        check_interval: Option<String>,
        /// Time one check may take (at most the interval) [default: 1s].
        #[arg(long, value_name = "DURATION")]
        check_timeout: Option<String>,
        /// Consecutive passed checks that bring a backend up (1-100) [default: 2].
        #[arg(long)]
        rise: Option<u32>,
        /// Consecutive failed checks that take a backend down (1-100) [default: 3].
        #[arg(long)]
        fall: Option<u32>,
        /// Send a PROXY protocol v2 header to the backends (they see the client's address).
        #[arg(long)]
        proxy_protocol: bool,
        /// Maglev lookup table size, a prime from 7 [default: 65537].
        #[arg(long)]
        maglev_table_size: Option<u32>,
    },
    /// Backends of a VIP.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// List VIPs with their backend counts and the instance holding each.
    Ls,
    /// Show one VIP: settings, and each backend's weight, state, health, connections and
    /// bytes as the lb-vip instances report them.
    Show { name: String },
    /// Delete a VIP.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Add a backend.
    Add {
        /// The VIP.
        name: String,
        /// IP:PORT of the backend.
        addr: String,
        /// Share of new connections, 1-256 [default: 1].
        #[arg(long)]
        weight: Option<u32>,
        /// At most this many connections (TCP) or flows (UDP) at once [default: no limit].
        #[arg(long)]
        max_conns: Option<u32>,
    },
    /// Remove a backend (its established connections drain for the VIP's --drain).
    Rm { name: String, addr: String },
    /// Drain a backend: no new connections; established ones go on for the VIP's --drain.
    Drain { name: String, addr: String },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

impl From<ProtoArg> for api::VipProto {
    fn from(p: ProtoArg) -> Self {
        match p {
            ProtoArg::Tcp => api::VipProto::Tcp,
            ProtoArg::Udp => api::VipProto::Udp,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum AlgoArg {
    /// Round robin.
    Rr,
    /// Smooth weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Power of two random choices.
    P2c,
    /// Hash of the client IP.
    SourceHash,
    /// Maglev consistent hashing (instances agree without sharing state).
    Maglev,
}

impl From<AlgoArg> for api::VipAlgo {
    fn from(a: AlgoArg) -> Self {
        match a {
            AlgoArg::Rr => api::VipAlgo::Rr,
            AlgoArg::Wrr => api::VipAlgo::Wrr,
            AlgoArg::Lc => api::VipAlgo::Lc,
            AlgoArg::Wlc => api::VipAlgo::Wlc,
            AlgoArg::P2c => api::VipAlgo::P2c,
            AlgoArg::SourceHash => api::VipAlgo::SourceHash,
            AlgoArg::Maglev => api::VipAlgo::Maglev,
        }
    }
}

/// A duration in milliseconds: `500ms`, `2s`, `1.5s`, `1m`, or a bare number of seconds.
pub fn parse_duration_ms(flag: &str, s: &str) -> anyhow::Result<u32> {
    let bad = || anyhow::anyhow!("{flag} {s:?}: expected a duration like 2s, 500ms or 1m");
    let t = s.trim();
    let (num, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (t, 1000.0)
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let ms = (v * unit_ms).round();
    if !(0.0..=u32::MAX as f64).contains(&ms) {
        return Err(bad());
    }
    Ok(ms as u32)
}

/// The health check of `vip create`: None when no check flag is given (the manager's
/// default, a TCP check); else `--check` (or tcp) with the other flags over it.
pub fn build_check(
    check: Option<&str>,
    interval: Option<&str>,
    timeout: Option<&str>,
    rise: Option<u32>,
    fall: Option<u32>,
) -> anyhow::Result<Option<api::HealthCheck>> {
    if check.is_none()
        && interval.is_none()
        && timeout.is_none()
        && rise.is_none()
        && fall.is_none()
    {
        return Ok(None);
    }
    let mut c = volume_mgr::vip::parse_check_spec(check.unwrap_or("tcp"))
        .map_err(|e| anyhow::anyhow!("--check: {e}"))?;
    if let Some(i) = interval {
        c.interval_ms = parse_duration_ms("--check-interval", i)?;
    }
    if let Some(t) = timeout {
        c.timeout_ms = parse_duration_ms("--check-timeout", t)?;
    }
    if let Some(r) = rise {
        c.rise = r;
    }
    if let Some(f) = fall {
        c.fall = f;
    }
    Ok(Some(c))
}

/// `1500` → `1.5s`, `2000` → `2s`, `250` → `250ms`.
fn ms(v: u32) -> String {
    if v >= 1000 && v.is_multiple_of(100) {
        let s = v as f64 / 1000.0;
        format!("{s}s")
    } else {
        format!("{v}ms")
    }
}

fn check_line(c: &api::HealthCheck) -> String {
    format!(
        "{} every {}, timeout {}, rise {}, fall {}",
        volume_mgr::vip::check_spec(c),
        ms(c.interval_ms),
        ms(c.timeout_ms),
        c.rise,
        c.fall
    )
}

/// Nodes whose fresh report says they hold the address, or `-`.
fn holders(v: &api::Vip) -> String {
    let h: Vec<&str> = v
        .reports
        .iter()
        .filter(|(_, r)| r.holder)
        .map(|(n, _)| n.as_str())
        .collect();
    if h.is_empty() {
        "-".into()
    } else {
        h.join(",")
    }
}

/// The holder lease by the manager's record: `h1 (epoch 3, 1.2s left)`, or who held it last.
fn lease_line(l: Option<&api::VipLease>, now_ms: u64) -> String {
    match l {
        None => "- (never held)".into(),
        Some(l) if l.is_held(now_ms) => format!(
            "{} (epoch {}, {:.1}s left)",
            l.holder,
            l.epoch,
            (l.expires_ms - now_ms) as f64 / 1000.0
        ),
        Some(l) => format!("- (last {}, epoch {}, ended)", l.holder, l.epoch),
    }
}

/// NAME ADDR PROTO ALGO BACKENDS HOLDER.
fn vip_rows(vs: &[api::Vip]) -> Vec<Vec<String>> {
    vs.iter()
        .map(|v| {
            let draining = v
                .backends
                .iter()
                .filter(|b| b.state == api::BackendState::Draining)
                .count();
            vec![
                v.name.clone(),
                v.addr.clone(),
                v.proto.to_string(),
                v.algo.to_string(),
                if draining == 0 {
                    v.backends.len().to_string()
                } else {
                    format!("{} ({draining} draining)", v.backends.len())
                },
                holders(v),
            ]
        })
        .collect()
}

/// The `key value` lines of `vip show`.
fn vip_details(v: &api::Vip) -> Vec<(&'static str, String)> {
    vec![
        ("name", v.name.clone()),
        ("addr", v.addr.clone()),
        ("proto", v.proto.to_string()),
        (
            "network",
            v.network.clone().unwrap_or_else(|| "- (host)".into()),
        ),
        ("algo", v.algo.to_string()),
        (
            "persist",
            if v.persist_secs == 0 {
                "off".into()
            } else {
                format!("{}s", v.persist_secs)
            },
        ),
        ("drain", format!("{}s", v.drain_secs)),
        ("check", check_line(&v.check)),
        (
            "proxy proto",
            if v.proxy_protocol { "v2" } else { "off" }.into(),
        ),
        ("maglev table", v.maglev_table_size.to_string()),
        ("holder", holders(v)),
        (
            "lease",
            lease_line(v.lease.as_ref(), volume_mgr::server::now_ms()),
        ),
        (
            "reports",
            if v.reports.is_empty() {
                "no reports yet".into()
            } else {
                v.reports.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        ),
        ("created", ago(v.created_ms)),
    ]
}

/// What the instances report about one backend, summed over them.
#[derive(Default)]
struct Seen {
    instances: u64,
    healthy: u64,
    active: u64,
    total: u64,
    bytes_in: u64,
    bytes_out: u64,
}

fn seen(v: &api::Vip, addr: &str) -> Seen {
    let mut s = Seen::default();
    for b in v
        .reports
        .values()
        .flat_map(|r| r.backends.iter().filter(|b| b.addr == addr))
    {
        s.instances += 1;
        s.healthy += u64::from(b.healthy);
        s.active = s.active.saturating_add(b.active_conns);
        s.total = s.total.saturating_add(b.total_conns);
        s.bytes_in = s.bytes_in.saturating_add(b.bytes_in);
        s.bytes_out = s.bytes_out.saturating_add(b.bytes_out);
    }
    s
}

/// BACKEND WEIGHT STATE HEALTH ACTIVE TOTAL BYTES: the VIP's backends, then backends the
/// instances still report but the VIP no longer has (state `removed`: draining away).
/// HEALTH is `up`/`down` when every reporting instance agrees, `up on N/M` otherwise, `-`
/// without reports; BYTES is in/out (client to backend / backend to client).
fn backend_rows(v: &api::Vip, now_ms: u64) -> Vec<Vec<String>> {
    let mut addrs: Vec<(String, String, String)> = v
        .backends
        .iter()
        .map(|b| {
            let state = match (b.state, b.drain_started_ms) {
                (api::BackendState::Active, _) => "active".to_string(),
                (api::BackendState::Draining, Some(t)) => {
                    let end = t.saturating_add(u64::from(v.drain_secs) * 1000);
                    if now_ms >= end {
                        "draining (done)".into()
                    } else {
                        format!("draining ({}s left)", (end - now_ms).div_ceil(1000))
                    }
                }
                (api::BackendState::Draining, None) => "draining".into(),
            };
            (b.addr.clone(), b.weight.to_string(), state)
        })
        .collect();
    let mut gone: Vec<String> = v
        .reports
        .values()
        .flat_map(|r| r.backends.iter().map(|b| b.addr.clone()))
        .filter(|a| !v.backends.iter().any(|b| &b.addr == a))
        .collect();
    gone.sort();
    gone.dedup();
    addrs.extend(gone.into_iter().map(|a| (a, "-".into(), "removed".into())));
    addrs
        .into_iter()
        .map(|(addr, weight, state)| {
            let s = seen(v, &addr);
            let (health, active, total, bytes) = if s.instances == 0 {
                ("-".into(), "-".into(), "-".into(), "-".into())
            } else {
                (
                    if s.healthy == s.instances {
                        "up".to_string()
                    } else if s.healthy == 0 {
                        "down".to_string()
                    } else {
                        format!("up on {}/{}", s.healthy, s.instances)
                    },
                    s.active.to_string(),
                    s.total.to_string(),
                    format!("{}/{}", human(s.bytes_in), human(s.bytes_out)),
                )
            };
            vec![addr, weight, state, health, active, total, bytes]
        })
        .collect()
}

fn print_rows(rows: &[(&str, String)]) {
    for (k, v) in rows {
        println!("{k:<12} {v}");
    }
}

pub async fn vip(client: &Client, cmd: VipCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        VipCmd::Create {
            name,
            addr,
            proto,
            net,
            algo,
            persist,
            drain,
            check,
            check_interval,
            check_timeout,
            rise,
            fall,
            proxy_protocol,
            maglev_table_size,
        } => {
            let check = build_check(
                check.as_deref(),
                check_interval.as_deref(),
                check_timeout.as_deref(),
                rise,
                fall,
            )?;
            let v = client
                .create_vip(&api::CreateVip {
                    name,
                    addr,
                    proto: proto.into(),
                    network: net,
                    algo: algo.map(Into::into),
                    persist_secs: persist,
                    drain_secs: drain,
                    check,
                    proxy_protocol: proxy_protocol.then_some(true),
                    maglev_table_size,
                })
                .await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "created vip {} ({} {}, algo {}, check {})",
                    v.name,
                    v.proto,
                    v.addr,
                    v.algo,
                    volume_mgr::vip::check_spec(&v.check)
                );
            }
        }
        VipCmd::Backend(BackendCmd::Add {
            name,
            addr,
            weight,
            max_conns,
        }) => {
            let v = client
                .add_backend(
                    &name,
                    &api::AddBackend {
                        addr: addr.clone(),
                        weight,
                        max_conns,
                    },
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                let b = v.backends.last();
                println!(
                    "added backend {} to vip {} (weight {}{})",
                    b.map(|b| b.addr.as_str()).unwrap_or(&addr),
                    v.name,
                    b.map(|b| b.weight).unwrap_or(1),
                    b.and_then(|b| b.max_conns)
                        .map(|m| format!(", at most {m} connections"))
                        .unwrap_or_default()
                );
            }
        }
        VipCmd::Backend(BackendCmd::Rm { name, addr }) => {
            let v = client.remove_backend(&name, &addr).await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "removed backend {addr} from vip {} (its connections may go on for {}s)",
                    v.name, v.drain_secs
                );
            }
        }
        VipCmd::Backend(BackendCmd::Drain { name, addr }) => {
            let v = client.drain_backend(&name, &addr).await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "draining backend {addr} of vip {}: no new connections, established ones may go on for {}s",
                    v.name, v.drain_secs
                );
            }
        }
        VipCmd::Ls => {
            let vs = client.list_vips().await?.items;
            if json {
                print_json(&vs)?;
            } else {
                table::print(
                    &["NAME", "ADDR", "PROTO", "ALGO", "BACKENDS", "HOLDER"],
                    &vip_rows(&vs),
                );
            }
        }
        VipCmd::Show { name } => {
            let v = client.get_vip(&name).await?;
            if json {
                print_json(&v)?;
            } else {
                print_rows(&vip_details(&v));
                println!();
                let rows = backend_rows(&v, volume_mgr::server::now_ms());
                if rows.is_empty() {
                    println!("no backends");
                } else {
                    table::print(
                        &[
                            "BACKEND", "WEIGHT", "STATE", "HEALTH", "ACTIVE", "TOTAL", "BYTES",
                        ],
                        &rows,
                    );
                }
            }
        }
        VipCmd::Rm { name } => {
            client.delete_vip(&name).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted vip {name}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration_ms("--x", s);
        assert_eq!(d("2s").unwrap(), 2000);
        assert_eq!(d("500ms").unwrap(), 500);
        assert_eq!(d("1.5s").unwrap(), 1500);
        assert_eq!(d("1m").unwrap(), 60_000);
        assert_eq!(d("3").unwrap(), 3000);
        assert_eq!(d("0ms").unwrap(), 0);
        for bad in [
            "",
            "s",
            "-1s",
            "2h",
            "1e3ms",
            "1.2.3s",
            "99999999999s",
            "two",
        ] {
            assert_eq!(
                d(bad).unwrap_err().to_string(),
                format!("--x {bad:?}: expected a duration like 2s, 500ms or 1m"),
                "{bad}"
            );
        }
    }

    #[test]
    fn checks_from_flags() {
        assert_eq!(build_check(None, None, None, None, None).unwrap(), None);
        let c = build_check(None, Some("500ms"), None, None, Some(5))
            .unwrap()
            .unwrap();
        assert_eq!(c.kind, api::CheckKind::Tcp);
        assert_eq!((c.interval_ms, c.timeout_ms, c.fall), (500, 1000, 5));
        let c = build_check(Some("http:/hz:204"), None, Some("100ms"), Some(1), None)
            .unwrap()
            .unwrap();
        assert_eq!(c.http_path.as_deref(), Some("/hz"));
        assert_eq!(c.http_status, Some(204));
        assert_eq!((c.timeout_ms, c.rise), (100, 1));
        assert_eq!(
            build_check(Some("icmp"), None, None, None, None)
                .unwrap_err()
                .to_string(),
            "--check: check \"icmp\" is not tcp or http:/PATH[:STATUS] (e.g. http:/healthz:200)"
        );
    }

    fn vip() -> api::Vip {
        let mut v = volume_mgr::vip::check_vip(
            &api::CreateVip {
                name: "web".into(),
                addr: "192.0.2.1:80".into(),
                proto: api::VipProto::Tcp,
                network: None,
                algo: Some(api::VipAlgo::SourceHash),
                persist_secs: None,
                drain_secs: Some(30),
                check: None,
                proxy_protocol: None,
                maglev_table_size: None,
            },
            0,
        )
        .unwrap();
        for (a, w) in [("10.0.0.1:80", 1), ("10.0.0.2:80", 3)] {
            v.backends.push(
                volume_mgr::vip::check_backend(&api::AddBackend {
                    addr: a.into(),
                    weight: Some(w),
                    max_conns: None,
                })
                .unwrap(),
            );
        }
        v
    }

    fn stats(addr: &str, healthy: bool, active: u64) -> api::BackendStats {
        api::BackendStats {
            addr: addr.into(),
            healthy,
            active_conns: active,
            total_conns: 10 * active,
            bytes_in: 1024 * active,
            bytes_out: 2048 * active,
            ..Default::default()
        }
    }

    #[test]
    fn rows_without_reports() {
        let mut v = vip();
        assert_eq!(
            vip_rows(std::slice::from_ref(&v)),
            vec![vec!["web", "192.0.2.1:80", "tcp", "source-hash", "2", "-"]]
        );
        let rows = backend_rows(&v, 1_000_000);
        assert_eq!(
            rows,
            vec![
                vec!["10.0.0.1:80", "1", "active", "-", "-", "-", "-"],
                vec!["10.0.0.2:80", "3", "active", "-", "-", "-", "-"],
            ]
        );
        let d = vip_details(&v);
        let get = |k: &str| d.iter().find(|r| r.0 == k).unwrap().1.clone();
        assert_eq!(get("reports"), "no reports yet");
        assert_eq!(get("check"), "tcp every 2s, timeout 1s, rise 2, fall 3");
        assert_eq!(get("persist"), "off");
        assert_eq!(get("network"), "- (host)");
        assert_eq!(get("holder"), "-");
        assert_eq!(get("lease"), "- (never held)");
        let l = api::VipLease {
            vip: "web".into(),
            holder: "h1".into(),
            epoch: 3,
            expires_ms: 10_000,
        };
        assert_eq!(lease_line(Some(&l), 8_800), "h1 (epoch 3, 1.2s left)");
        assert_eq!(lease_line(Some(&l), 10_000), "- (last h1, epoch 3, ended)");
        // Draining: time left, then done.
        volume_mgr::vip::drain(&mut v, 0, 1_000_000);
        assert_eq!(backend_rows(&v, 1_000_500)[0][2], "draining (30s left)");
        assert_eq!(backend_rows(&v, 1_029_001)[0][2], "draining (1s left)");
        assert_eq!(backend_rows(&v, 1_030_000)[0][2], "draining (done)");
        assert_eq!(vip_rows(&[v])[0][4], "2 (1 draining)");
    }

    #[test]
    fn rows_from_reports() {
        let mut v = vip();
        v.reports.insert(
            "h1".into(),
            api::VipReport {
                holder: true,
                backends: vec![
                    stats("10.0.0.1:80", true, 1),
                    stats("10.0.0.2:80", false, 0),
                    stats("10.0.0.9:80", true, 2),
                ],
            },
        );
        v.reports.insert(
            "h2".into(),
            api::VipReport {
                holder: false,
                backends: vec![stats("10.0.0.1:80", true, 2), stats("10.0.0.2:80", true, 1)],
            },
        );
        assert_eq!(vip_rows(std::slice::from_ref(&v))[0][5], "h1");
        let rows = backend_rows(&v, 0);
        assert_eq!(
            rows,
            vec![
                vec!["10.0.0.1:80", "1", "active", "up", "3", "30", "3 KiB/6 KiB"],
                vec![
                    "10.0.0.2:80",
                    "3",
                    "active",
                    "up on 1/2",
                    "1",
                    "10",
                    "1 KiB/2 KiB"
                ],
                vec![
                    "10.0.0.9:80",
                    "-",
                    "removed",
                    "up",
                    "2",
                    "20",
                    "2 KiB/4 KiB"
                ],
            ]
        );
        v.reports.get_mut("h2").unwrap().holder = true;
        assert_eq!(holders(&v), "h1,h2");
        let d = vip_details(&v);
        assert_eq!(d.iter().find(|r| r.0 == "reports").unwrap().1, "h1, h2");
    }

    #[test]
    fn short_durations() {
        assert_eq!(ms(2000), "2s");
        assert_eq!(ms(1500), "1.5s");
        assert_eq!(ms(250), "250ms");
        assert_eq!(ms(1001), "1001ms");
    }
}
