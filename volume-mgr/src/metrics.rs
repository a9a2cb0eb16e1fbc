//! volume-mgr's request counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl Metrics {
    pub fn count(&self, method: &str, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP volume_mgr_http_requests_total API requests by route and status.\n# TYPE volume_mgr_http_requests_total counter");
        for ((m, r, s), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "volume_mgr_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {n}"
            );
        }
    }
}

/// `{name}="value"` with the value escaped as the text exposition format wants.
fn label(name: &str, value: &str) -> String {
    let mut v = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => v.push_str("\\\\"),
            '"' => v.push_str("\\\""),
            '\n' => v.push_str("\\n"),
            c => v.push(c),
        }
    }
    format!("{name}=\"{v}\"")
}

/// VIP gauges: the VIPs, their backends by recorded state, how many instances claim to hold
/// each VIP (1 when all is well), and per backend the counters of the instances' fresh
/// reports summed over the instances (gauges: an instance whose report ages out stops
/// counting).
pub fn render_vips(out: &mut String, vips: &[crate::api::Vip]) {
    use crate::api::BackendState;
    let _ = writeln!(
        out,
        "# HELP volume_mgr_vips Load-balanced VIPs.\n# TYPE volume_mgr_vips gauge\nvolume_mgr_vips {}",
        vips.len()
    );
    let _ = writeln!(out, "# HELP volume_mgr_vip_backends Backends of a VIP by recorded state.\n# TYPE volume_mgr_vip_backends gauge");
    for v in vips {
        for (state, s) in [
            ("active", BackendState::Active),
            ("draining", BackendState::Draining),
        ] {
            let n = v.backends.iter().filter(|b| b.state == s).count();
            let _ = writeln!(
                out,
                "volume_mgr_vip_backends{{{},{}}} {n}",
                label("vip", &v.name),
                label("state", state)
            );
        }
    }
    let _ = writeln!(out, "# HELP volume_mgr_vip_holders lb-vip instances reporting that they hold the VIP's address.\n# TYPE volume_mgr_vip_holders gauge");
    for v in vips {
        let n = v.reports.values().filter(|r| r.holder).count();
        let _ = writeln!(
            out,
            "volume_mgr_vip_holders{{{}}} {n}",
            label("vip", &v.name)
        );
    }
    // Per backend, summed over the reporting instances.
    let mut sums: BTreeMap<(&str, &str), [u64; 7]> = BTreeMap::new();
    for v in vips {
        for r in v.reports.values() {
            for b in &r.backends {
                let s = sums.entry((&v.name, &b.addr)).or_default();
                for (i, x) in [
                    u64::from(b.healthy),
                    b.active_conns,
                    b.total_conns,
                    b.bytes_in,
                    b.bytes_out,
                    b.health_transitions,
                    b.errors,
                ]
                .into_iter()
                .enumerate()
                {
                    s[i] = s[i].saturating_add(x);
                }
            }
        }
    }
    for (i, (name, help)) in [
        ("healthy", "Instances that see the backend healthy."),
        ("active_conns", "Established connections to the backend."),
        ("conns", "Connections made to the backend."),
        ("bytes_in", "Bytes from clients to the backend."),
        ("bytes_out", "Bytes from the backend to clients."),
        ("health_transitions", "Health changes of the backend."),
        (
            "errors",
            "Failed connects and connections ended by an error.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let _ = writeln!(out, "# HELP volume_mgr_vip_backend_{name} {help} As the lb-vip instances last reported, summed over them.\n# TYPE volume_mgr_vip_backend_{name} gauge");
        for ((vip, backend), s) in &sums {
            let _ = writeln!(
                out,
                "volume_mgr_vip_backend_{name}{{{},{}}} {}",
                label("vip", vip),
                label("backend", backend),
                s[i]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api;

    #[test]
    fn vip_gauges() {
        let report = |holder, active, bytes| api::VipReport {
            holder,
            backends: vec![api::BackendStats {
                addr: "10.0.0.5:80".into(),
                healthy: true,
                active_conns: active,
                total_conns: 10,
                bytes_in: bytes,
                bytes_out: 2 * bytes,
                health_transitions: 1,
                errors: 0,
            }],
        };
        let mut v = crate::vip::check_vip(
            &api::CreateVip {
                name: "web".into(),
                addr: "192.0.2.1:80".into(),
                proto: api::VipProto::Tcp,
                network: None,
                algo: None,
                persist_secs: None,
                drain_secs: None,
                check: None,
                proxy_protocol: None,
                maglev_table_size: None,
            },
            0,
        )
        .unwrap();
        for a in ["10.0.0.5:80", "10.0.0.6:80"] {
            v.backends.push(
                crate::vip::check_backend(&api::AddBackend {
                    addr: a.into(),
                    weight: None,
                    max_conns: None,
                })
                .unwrap(),
            );
        }
        v.backends[1].state = api::BackendState::Draining;
        v.reports.insert("h1".into(), report(true, 2, 100));
        v.reports.insert("h2".into(), report(false, 3, 50));
        let mut out = String::new();
        render_vips(&mut out, &[v]);
        for line in [
            "volume_mgr_vips 1",
            "volume_mgr_vip_backends{vip=\"web\",state=\"active\"} 1",
            "volume_mgr_vip_backends{vip=\"web\",state=\"draining\"} 1",
            "volume_mgr_vip_holders{vip=\"web\"} 1",
            "volume_mgr_vip_backend_healthy{vip=\"web\",backend=\"10.0.0.5:80\"} 2",
            "volume_mgr_vip_backend_active_conns{vip=\"web\",backend=\"10.0.0.5:80\"} 5",
            "volume_mgr_vip_backend_conns{vip=\"web\",backend=\"10.0.0.5:80\"} 20",
            "volume_mgr_vip_backend_bytes_in{vip=\"web\",backend=\"10.0.0.5:80\"} 150",
            "volume_mgr_vip_backend_bytes_out{vip=\"web\",backend=\"10.0.0.5:80\"} 300",
            "volume_mgr_vip_backend_health_transitions{vip=\"web\",backend=\"10.0.0.5:80\"} 2",
            "volume_mgr_vip_backend_errors{vip=\"web\",backend=\"10.0.0.5:80\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
        // Every sample line belongs to a declared family.
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let family = l.split(['{', ' ']).next().unwrap();
            assert!(out.contains(&format!("# TYPE {family} gauge")), "{l}");
        }
        assert_eq!(label("a", "x\"y\\z\n"), "a=\"x\\\"y\\\\z\\n\"");
    }
}
