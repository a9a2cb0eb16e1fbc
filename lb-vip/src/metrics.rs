//! lb-vip's metrics, defined in one place: lock-free counters per VIP and per backend that
//! the proxies update, and their Prometheus text rendering.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of one backend of one VIP.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Established connections (TCP) or live flows (UDP).
    pub active: AtomicU64,
    /// Connections (flows) ever sent to it.
    pub total: AtomicU64,
    /// Bytes from clients to the backend.
    pub bytes_in: AtomicU64,
    /// Bytes from the backend to clients.
    pub bytes_out: AtomicU64,
    /// Connect failures (refused, timed out) and UDP send errors.
    pub errors: AtomicU64,
    /// Up/down health changes.
    pub transitions: AtomicU64,
    /// Current health (mirrors the state machine for lock-free reads).
    pub up: AtomicBool,
    /// Connections closed because a drain (or removal) ran out.
    pub drain_closed: AtomicU64,
    /// Administratively active: not draining, not removed (gets new connections while up).
    pub serving: AtomicBool,
}

impl BackendStats {
    pub fn new() -> BackendStats {
        BackendStats {
            up: AtomicBool::new(true),
            serving: AtomicBool::new(true),
            ..BackendStats::default()
        }
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(c: &AtomicU64) {
        // Never below zero.
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Counters of one VIP (besides its backends').
#[derive(Debug, Default)]
pub struct VipStats {
    /// Connections accepted (TCP) or flows created (UDP).
    pub accepted: AtomicU64,
    /// Clients turned away: no backend usable or every attempt failed.
    pub no_backend: AtomicU64,
    /// Accept / receive errors on the VIP socket.
    pub socket_errors: AtomicU64,
    /// Datagrams dropped as unusable (empty, truncated) or because the flow table was full.
    pub udp_dropped: AtomicU64,
    /// Connection attempts retried on another backend after a passive failure.
    pub retries: AtomicU64,
    /// With `--vip-interface`: this instance holds the VIP's lease (and so its address).
    pub holder: AtomicBool,
    /// Leases acquired (a new tenure: address added, socket bound, gratuitous ARP sent).
    pub lease_acquired: AtomicU64,
    /// Leases lost (refused renewal, or not renewed in time: address removed, socket closed).
    pub lease_lost: AtomicU64,
}

/// A labelled sample row for [`render`].
pub struct BackendRow<'a> {
    pub vip: &'a str,
    pub backend: &'a str,
    pub stats: &'a BackendStats,
}

pub struct VipRow<'a> {
    pub vip: &'a str,
    pub proto: &'a str,
    pub listening: bool,
    pub stats: &'a VipStats,
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text for the given VIPs and backends.
pub fn render(out: &mut String, vips: &[VipRow<'_>], backends: &[BackendRow<'_>]) {
    type VipGet = fn(&VipStats) -> u64;
    let vip_metrics: [(&str, &str, &str, VipGet); 8] = [
        (
            "lbvip_vip_accepted_total",
            "counter",
            "Connections accepted (TCP) or flows created (UDP).",
            |s| BackendStats::get(&s.accepted),
        ),
        (
            "lbvip_vip_no_backend_total",
            "counter",
            "Clients turned away: no usable backend or every attempt failed.",
            |s| BackendStats::get(&s.no_backend),
        ),
        (
            "lbvip_vip_socket_errors_total",
            "counter",
            "Accept or receive errors on the VIP socket.",
            |s| BackendStats::get(&s.socket_errors),
        ),
        (
            "lbvip_vip_udp_dropped_total",
            "counter",
            "UDP datagrams dropped (unusable, or flow table full).",
            |s| BackendStats::get(&s.udp_dropped),
        ),
        (
            "lbvip_vip_retries_total",
            "counter",
            "Connections retried on another backend after a failed connect.",
            |s| BackendStats::get(&s.retries),
        ),
        (
            "lbvip_vip_holder",
            "gauge",
            "1 while this instance holds the VIP's lease and address (--vip-interface).",
            |s| u64::from(s.holder.load(Ordering::Relaxed)),
        ),
        (
            "lbvip_vip_lease_acquired_total",
            "counter",
            "VIP leases acquired (address added and announced).",
            |s| BackendStats::get(&s.lease_acquired),
        ),
        (
            "lbvip_vip_lease_lost_total",
            "counter",
            "VIP leases lost (renewal refused or late: address removed, socket closed).",
            |s| BackendStats::get(&s.lease_lost),
        ),
    ];
    let _ = writeln!(
        out,
        "# HELP lbvip_vip_listening Whether this instance serves the VIP (its socket is bound).\n# TYPE lbvip_vip_listening gauge"
    );
    for v in vips {
        let _ = writeln!(
            out,
            "lbvip_vip_listening{{vip=\"{}\",proto=\"{}\"}} {}",
            esc(v.vip),
            v.proto,
            u8::from(v.listening)
        );
    }
    for (name, kind, help, get) in vip_metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for v in vips {
            let _ = writeln!(out, "{name}{{vip=\"{}\"}} {}", esc(v.vip), get(v.stats));
        }
    }
    type BackendGet = fn(&BackendStats) -> u64;
    let backend_metrics: [(&str, &str, &str, BackendGet); 9] = [
        (
            "lbvip_backend_active",
            "gauge",
            "Established connections (TCP) or live flows (UDP).",
            |s| BackendStats::get(&s.active),
        ),
        (
            "lbvip_backend_connections_total",
            "counter",
            "Connections (UDP flows) sent to the backend.",
            |s| BackendStats::get(&s.total),
        ),
        (
            "lbvip_backend_bytes_in_total",
            "counter",
            "Bytes from clients to the backend.",
            |s| BackendStats::get(&s.bytes_in),
        ),
        (
            "lbvip_backend_bytes_out_total",
            "counter",
            "Bytes from the backend to clients.",
            |s| BackendStats::get(&s.bytes_out),
        ),
        (
            "lbvip_backend_errors_total",
            "counter",
            "Failed connects (refused, timed out) and send errors.",
            |s| BackendStats::get(&s.errors),
        ),
        (
            "lbvip_backend_health_transitions_total",
            "counter",
            "Health changes (up to down and back).",
            |s| BackendStats::get(&s.transitions),
        ),
        (
            "lbvip_backend_drain_closed_total",
            "counter",
            "Connections closed when a drain ran out.",
            |s| BackendStats::get(&s.drain_closed),
        ),
        (
            "lbvip_backend_up",
            "gauge",
            "1 when the backend is healthy.",
            |s| u64::from(s.up.load(Ordering::Relaxed)),
        ),
        (
            "lbvip_backend_serving",
            "gauge",
            "1 unless the backend is draining or removed.",
            |s| u64::from(s.serving.load(Ordering::Relaxed)),
        ),
    ];
    for (name, kind, help, get) in backend_metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for b in backends {
            let _ = writeln!(
                out,
                "{name}{{vip=\"{}\",backend=\"{}\"}} {}",
                esc(b.vip),
                esc(b.backend),
                get(b.stats)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_rows() {
        let b = BackendStats::new();
        BackendStats::add(&b.total, 3);
        BackendStats::add(&b.active, 1);
        BackendStats::sub(&b.active);
        BackendStats::sub(&b.active);
        let v = VipStats::default();
        BackendStats::add(&v.accepted, 3);
        let mut out = String::new();
        render(
            &mut out,
            &[VipRow {
                vip: "web\"1",
                proto: "tcp",
                listening: true,
                stats: &v,
            }],
            &[BackendRow {
                vip: "web\"1",
                backend: "10.0.0.1:80",
                stats: &b,
            }],
        );
        assert!(
            out.contains("lbvip_vip_accepted_total{vip=\"web\\\"1\"} 3\n"),
            "{out}"
        );
        assert!(out.contains(
            "lbvip_backend_connections_total{vip=\"web\\\"1\",backend=\"10.0.0.1:80\"} 3\n"
        ));
        assert!(out.contains("lbvip_backend_active{vip=\"web\\\"1\",backend=\"10.0.0.1:80\"} 0\n"));
        assert!(out.contains("lbvip_backend_up{vip=\"web\\\"1\",backend=\"10.0.0.1:80\"} 1\n"));
        assert!(out.contains("lbvip_vip_listening{vip=\"web\\\"1\",proto=\"tcp\"} 1\n"));
        assert!(
            out.contains("lbvip_vip_holder{vip=\"web\\\"1\"} 0\n"),
            "{out}"
        );
        assert!(out.contains("lbvip_vip_lease_lost_total{vip=\"web\\\"1\"} 0\n"));
    }
}
