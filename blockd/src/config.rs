//! blockd configuration: TOML file (`--config`, kebab-case keys) overlaid by flags.

use crate::chunkstore::{parse_size, DiskConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Keys of the TOML file; every one can also be given as a flag (flags win).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub manager: Option<String>,
    pub manager_token: Option<String>,
    pub manager_ca: Option<PathBuf>,
    pub node: Option<String>,
    pub listen: Option<String>,
    pub nbd_listen: Option<String>,
    pub nbd_socket: Option<PathBuf>,
    pub http_listen: Option<String>,
    #[serde(default)]
    pub disk: Vec<String>,
    pub zone: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub worker_threads: Option<usize>,
    pub secret_file: Option<PathBuf>,
    pub replica_timeout: Option<String>,
    pub min_replicas_wait: Option<String>,
    pub recovery_bandwidth: Option<String>,
    pub scrub_rate: Option<String>,
    pub scrub_interval: Option<String>,
    pub full_ratio: Option<f64>,
}

/// The validated configuration blockd runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// volume-mgr URLs (comma-separated on the command line; the first that answers is used).
    pub manager: Vec<String>,
    /// Bearer token sent to volume-mgr.
    pub manager_token: Option<String>,
    /// PEM CA certificate trusted for an https:// volume-mgr.
    pub manager_ca: Option<PathBuf>,
    pub node: String,
    /// Replica protocol address (registered with volume-mgr).
    pub listen: SocketAddr,
    pub nbd_listen: Option<SocketAddr>,
    pub nbd_socket: Option<PathBuf>,
    /// `/metrics` and `/healthz`.
    pub http_listen: Option<SocketAddr>,
    pub disks: Vec<DiskConfig>,
    pub zone: Option<String>,
    pub heartbeat_interval: Duration,
    /// Async worker threads (besides the io_uring thread).
    pub worker_threads: usize,
    /// The cluster secret (shared by every blockd; the replica protocol authenticates peers
    /// with it). None: only volumes whose replicas are all on this host can be served.
    pub secret: Option<Vec<u8>>,
    /// Longest wait for a replica's answer before it counts as failed.
    pub replica_timeout: Duration,
    /// How long I/O waits for `min_replicas` in-service replicas before failing with EIO.
    pub min_replicas_wait: Duration,
    /// Bytes per second this daemon's background copies (resync, re-replication) may move;
    /// 0 = unlimited.
    pub recovery_bandwidth: u64,
    /// Bytes per second the background scrub reads to verify stored checksums; 0 = off.
    pub scrub_rate: u64,
    /// Pause between the end of one full scrub pass and the start of the next.
    pub scrub_interval: Duration,
    /// Share of the chunk slots past which no new chunk is taken (writes needing one fail
    /// with ENOSPC; volume-mgr's placement skips disks this full by their reported use).
    pub full_ratio: f64,
}

/// Default async workers: half the CPUs (at least one). One worker per connection's tasks
/// avoids cross-CPU wake-ups, which dominate latency at queue depth 1 (see BENCHMARKS.md).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() / 2).max(1))
        .unwrap_or(1)
}

/// Parses `5s`, `500ms`, `2m`, `1h`, or plain seconds (the same syntax as volume-mgr's).
pub use volume_mgr::humantime_serde::parse as parse_duration;

fn addr(key: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{key}: {s:?} is not an IP:PORT address"))
}

impl FileConfig {
    pub fn from_file(path: &std::path::Path) -> Result<FileConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// `self` overlaid with `flags` (flags win; disks from flags replace the file's).
    pub fn overlay(self, flags: FileConfig) -> FileConfig {
        FileConfig {
            manager: flags.manager.or(self.manager),
            manager_token: flags.manager_token.or(self.manager_token),
            manager_ca: flags.manager_ca.or(self.manager_ca),
            node: flags.node.or(self.node),
            listen: flags.listen.or(self.listen),
            nbd_listen: flags.nbd_listen.or(self.nbd_listen),
            nbd_socket: flags.nbd_socket.or(self.nbd_socket),
            http_listen: flags.http_listen.or(self.http_listen),
            disk: if flags.disk.is_empty() {
                self.disk
            } else {
                flags.disk
            },
            zone: flags.zone.or(self.zone),
            heartbeat_interval: flags.heartbeat_interval.or(self.heartbeat_interval),
            worker_threads: flags.worker_threads.or(self.worker_threads),
            secret_file: flags.secret_file.or(self.secret_file),
            replica_timeout: flags.replica_timeout.or(self.replica_timeout),
            min_replicas_wait: flags.min_replicas_wait.or(self.min_replicas_wait),
            recovery_bandwidth: flags.recovery_bandwidth.or(self.recovery_bandwidth),
            scrub_rate: flags.scrub_rate.or(self.scrub_rate),
            scrub_interval: flags.scrub_interval.or(self.scrub_interval),
            full_ratio: flags.full_ratio.or(self.full_ratio),
        }
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Config, String> {
        let node = match self.node {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "localhost".into()),
        };
        if node.is_empty()
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "node: {node:?} is not a valid node name (A-Z a-z 0-9 - _ .)"
            ));
        }
        if self.disk.is_empty() {
            return Err("no disks: give at least one --disk PATH[:SIZE]".into());
        }
        let disks = self
            .disk
            .iter()
            .map(|d| DiskConfig::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        let nbd_listen = match self.nbd_listen.as_deref() {
            Some("") | Some("none") => None,
            Some(s) => Some(addr("nbd-listen", s)?),
            None => Some(addr("nbd-listen", "127.0.0.1:10809")?),
        };
        let http_listen = match self.http_listen.as_deref() {
            Some("") | Some("none") => None,
            Some(s) => Some(addr("http-listen", s)?),
            None => Some(addr("http-listen", "127.0.0.1:7801")?),
        };
        let manager: Vec<String> = self
            .manager
            .as_deref()
            .unwrap_or("http://127.0.0.1:7700")
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if manager.is_empty()
            || manager
                .iter()
                .any(|m| !(m.starts_with("http://") || m.starts_with("https://")))
        {
            return Err("manager: give http://HOST:PORT URLs".into());
        }
        let heartbeat_interval =
            parse_duration(self.heartbeat_interval.as_deref().unwrap_or("1s"))?;
        if heartbeat_interval.is_zero() {
            return Err("heartbeat-interval must be positive".into());
        }
        let _ = parse_size; // sizes are parsed by DiskConfig
        let worker_threads = self.worker_threads.unwrap_or_else(default_worker_threads);
        if worker_threads == 0 || worker_threads > 1024 {
            return Err(format!(
                "worker-threads must be 1..=1024, got {worker_threads}"
            ));
        }
        let secret = match &self.secret_file {
            None => None,
            Some(p) => {
                let b =
                    std::fs::read(p).map_err(|e| format!("secret-file {}: {e}", p.display()))?;
                let b: Vec<u8> = b.trim_ascii().to_vec();
                if b.len() < 16 {
                    return Err(format!(
                        "secret-file {}: the cluster secret must be at least 16 bytes",
                        p.display()
                    ));
                }
                Some(b)
            }
        };
        let replica_timeout = parse_duration(self.replica_timeout.as_deref().unwrap_or("5s"))?;
        let min_replicas_wait = parse_duration(self.min_replicas_wait.as_deref().unwrap_or("30s"))?;
        if replica_timeout.is_zero() {
            return Err("replica-timeout must be positive".into());
        }
        let recovery_bandwidth = crate::throttle::parse_bandwidth(
            self.recovery_bandwidth.as_deref().unwrap_or("100MiB/s"),
        )?;
        let t = self.scrub_rate.as_deref().unwrap_or("8MiB/s").trim();
        let scrub_rate = if t == "0" || t.eq_ignore_ascii_case("off") {
            0
        } else {
            crate::throttle::parse_bandwidth(t)
                .map_err(|e| e.replace("recovery-bandwidth", "scrub-rate"))?
        };
        let scrub_interval = parse_duration(self.scrub_interval.as_deref().unwrap_or("24h"))
            .map_err(|e| format!("scrub-interval: {e}"))?;
        let full_ratio = match self.full_ratio {
            Some(r) if r > 0.0 && r <= 1.0 => r,
            Some(r) => return Err(format!("full-ratio must be in (0, 1], got {r}")),
            None => 0.95,
        };
        if let Some(t) = &self.manager_token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("manager-token: visible ASCII characters only, not empty".into());
            }
        }
        Ok(Config {
            manager_token: self.manager_token,
            manager_ca: self.manager_ca,
            full_ratio,
            scrub_rate,
            scrub_interval,
            recovery_bandwidth,
            secret,
            replica_timeout,
            min_replicas_wait,
            manager,
            node,
            listen: addr("listen", self.listen.as_deref().unwrap_or("127.0.0.1:7800"))?,
            nbd_listen,
            nbd_socket: self.nbd_socket,
            http_listen,
            disks,
            zone: self.zone,
            heartbeat_interval,
            worker_threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let file: FileConfig = toml::from_str("node = \"a\"\ndisk = [\"/d/x:1G\"]\nnbd-listen = \"127.0.0.1:1\"\nheartbeat-interval = \"500ms\"\n").unwrap();
        let flags = FileConfig {
            node: Some("b".into()),
            ..Default::default()
        };
        let c = file.overlay(flags).resolve().unwrap();
        assert_eq!(c.node, "b");
        assert_eq!(c.nbd_listen, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(c.disks[0].size, Some(1 << 30));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.manager, vec!["http://127.0.0.1:7700".to_string()]);
        assert_eq!(c.listen, "127.0.0.1:7800".parse().unwrap());
        assert_eq!(c.recovery_bandwidth, 100 << 20);
        assert_eq!(c.scrub_rate, 8 << 20);
        assert_eq!(c.scrub_interval, Duration::from_secs(24 * 3600));
        let file: FileConfig = toml::from_str(
            "node = \"a\"\ndisk = [\"/d/x:1G\"]\nscrub-rate = \"1MiB/s\"\nscrub-interval = \"10m\"\n",
        )
        .unwrap();
        let c = file.resolve().unwrap();
        assert_eq!(c.scrub_rate, 1 << 20);
        assert_eq!(c.scrub_interval, Duration::from_secs(600));
    }

    #[test]
    fn errors_are_clear() {
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        let base = || FileConfig {
            node: Some("n".into()),
            disk: vec!["/x:1G".into()],
            ..Default::default()
        };
        assert!(FileConfig {
            disk: vec![],
            ..base()
        }
        .resolve()
        .unwrap_err()
        .contains("--disk"));
        assert!(FileConfig {
            listen: Some("nope".into()),
            ..base()
        }
        .resolve()
        .unwrap_err()
        .contains("listen"));
        assert!(FileConfig {
            node: Some("a b".into()),
            ..base()
        }
        .resolve()
        .is_err());
        assert!(FileConfig {
            manager: Some("ftp://x".into()),
            ..base()
        }
        .resolve()
        .is_err());
        assert!(FileConfig {
            heartbeat_interval: Some("5 parsecs".into()),
            ..base()
        }
        .resolve()
        .is_err());
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(FileConfig {
            recovery_bandwidth: Some("quick".into()),
            ..base()
        }
        .resolve()
        .unwrap_err()
        .contains("recovery-bandwidth"));
        assert!(FileConfig {
            scrub_rate: Some("fast".into()),
            ..base()
        }
        .resolve()
        .unwrap_err()
        .contains("scrub-rate"));
        assert!(FileConfig {
            scrub_interval: Some("often".into()),
            ..base()
        }
        .resolve()
        .unwrap_err()
        .contains("scrub-interval"));
        let off = FileConfig {
            scrub_rate: Some("0".into()),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(off.scrub_rate, 0);
        assert!(FileConfig {
            full_ratio: Some(1.5),
            ..base()
        }
        .resolve()
        .unwrap_err()
        .contains("full-ratio"));
        assert_eq!(base().resolve().unwrap().full_ratio, 0.95);
    }
}
