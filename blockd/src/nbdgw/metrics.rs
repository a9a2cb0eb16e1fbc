//! NBD counters, rendered for `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct NbdMetrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Requests by command (index = NBD command number, last = unknown).
    pub requests: [AtomicU64; 9],
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Errors sent, by errno: EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN.
    pub errors: [AtomicU64; 8],
    /// Connections closed for breaking the protocol (bad magic, oversized write).
    pub protocol_errors: AtomicU64,
    /// WRITEs whose payload never fully arrived (nothing was written).
    pub truncated_writes: AtomicU64,
}

const COMMANDS: [&str; 9] = [
    "read",
    "write",
    "disc",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
    "unknown",
];
const ERRNOS: [(u32, &str); 8] = [
    (1, "EPERM"),
    (5, "EIO"),
    (12, "ENOMEM"),
    (22, "EINVAL"),
    (28, "ENOSPC"),
    (75, "EOVERFLOW"),
    (95, "ENOTSUP"),
    (108, "ESHUTDOWN"),
];

impl NbdMetrics {
    pub fn count_request(&self, kind: u16) {
        let i = (kind as usize).min(COMMANDS.len() - 1);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_error(&self, errno: u32) {
        let i = ERRNOS.iter().position(|(e, _)| *e == errno).unwrap_or(1);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render_prometheus(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP blockd_nbd_connections_total NBD connections accepted.\n# TYPE blockd_nbd_connections_total counter\nblockd_nbd_connections_total {}", self.connections_total.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP blockd_nbd_connections_active NBD connections open.\n# TYPE blockd_nbd_connections_active gauge\nblockd_nbd_connections_active {}", self.connections_active.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP blockd_nbd_requests_total NBD requests by command.\n# TYPE blockd_nbd_requests_total counter");
        for (i, c) in COMMANDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "blockd_nbd_requests_total{{command=\"{c}\"}} {}",
                self.requests[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP blockd_nbd_errors_total NBD error replies by errno.\n# TYPE blockd_nbd_errors_total counter");
        for (i, (_, n)) in ERRNOS.iter().enumerate() {
            let _ = writeln!(
                out,
                "blockd_nbd_errors_total{{errno=\"{n}\"}} {}",
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "blockd_nbd_read_bytes_total",
                "Bytes sent in READ replies.",
                &self.read_bytes,
            ),
            (
                "blockd_nbd_write_bytes_total",
                "Bytes received in WRITE requests.",
                &self.write_bytes,
            ),
            (
                "blockd_nbd_protocol_errors_total",
                "Connections closed for protocol violations.",
                &self.protocol_errors,
            ),
            (
                "blockd_nbd_truncated_writes_total",
                "WRITEs cut off by a disconnect (not applied).",
                &self.truncated_writes,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}
