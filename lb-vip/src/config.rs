//! lb-vip configuration: the daemon's flags and TOML file (kebab-case keys, flags win), and
//! [`VipConfig`], the desired state of one VIP as the proxies use it (built from the control
//! plane's VIP resource by the daemon).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::health::CheckParams;
use crate::sched::{Algo, Proto};

/// Keys of the TOML file; every one can also be given as a flag (flags win).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub manager: Option<String>,
    pub manager_token: Option<String>,
    pub manager_ca: Option<std::path::PathBuf>,
    pub node: Option<String>,
    pub http_listen: Option<String>,
    pub report_interval: Option<String>,
    pub connect_timeout: Option<String>,
    pub udp_idle_timeout: Option<String>,
    pub vip_interface: Option<String>,
    pub overlay_netns_prefix: Option<String>,
}

/// The validated configuration lb-vip runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// volume-mgr URLs (tried in order).
    pub manager: Vec<String>,
    /// Bearer token sent to volume-mgr.
    pub manager_token: Option<String>,
    /// PEM CA certificate trusted for an https:// volume-mgr.
    pub manager_ca: Option<std::path::PathBuf>,
    pub node: String,
    /// `/metrics` and `/healthz`.
    pub http_listen: Option<SocketAddr>,
    /// Status reports to the manager.
    pub report_interval: Duration,
    /// Backend connect timeout (a timeout counts as a passive failure).
    pub connect_timeout: Duration,
    /// A UDP flow without traffic this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// High availability: serve a VIP only while holding its lease from the manager, adding
    /// its address to this interface (see [`crate::ha`]). None: serve every VIP whose address
    /// is local.
    pub vip_interface: Option<String>,
    /// Overlay VIPs live in namespace PREFIX + network name (see [`crate::overlay`]).
    pub overlay_netns_prefix: String,
}

fn duration(key: &str, v: Option<&str>, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = volume_mgr::humantime_serde::parse(s).map_err(|e| format!("{key}: {e}"))?;
            if d.is_zero() {
                return Err(format!("{key}: must be more than zero"));
            }
            Ok(d)
        }
    }
}

impl FileConfig {
    pub fn from_file(path: &std::path::Path) -> Result<FileConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// `self` overlaid with `flags` (flags win).
    pub fn overlay(self, flags: FileConfig) -> FileConfig {
        FileConfig {
            manager: flags.manager.or(self.manager),
            manager_token: flags.manager_token.or(self.manager_token),
            manager_ca: flags.manager_ca.or(self.manager_ca),
            node: flags.node.or(self.node),
            http_listen: flags.http_listen.or(self.http_listen),
            report_interval: flags.report_interval.or(self.report_interval),
            connect_timeout: flags.connect_timeout.or(self.connect_timeout),
            udp_idle_timeout: flags.udp_idle_timeout.or(self.udp_idle_timeout),
            vip_interface: flags.vip_interface.or(self.vip_interface),
            overlay_netns_prefix: flags.overlay_netns_prefix.or(self.overlay_netns_prefix),
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
        let manager: Vec<String> = self
            .manager
            .unwrap_or_else(|| "http://127.0.0.1:7700".into())
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if manager.is_empty() {
            return Err("manager: no URL given".into());
        }
        if let Some(bad) = manager
            .iter()
            .find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            return Err(format!("manager: {bad:?} is not an http:// URL"));
        }
        let http_listen = match self.http_listen.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 7950))),
            Some("none") => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| format!("http-listen: {s:?} is not IP:PORT (or \"none\")"))?,
            ),
        };
        if let Some(i) = &self.vip_interface {
            if !valid_ifname(i) {
                return Err(format!(
                    "vip-interface: {i:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
                ));
            }
        }
        let overlay_netns_prefix = self
            .overlay_netns_prefix
            .unwrap_or_else(|| crate::overlay::NETNS_PREFIX.to_string());
        if overlay_netns_prefix.len() > 32
            || overlay_netns_prefix.contains(['/', ' ', '\0'])
            || overlay_netns_prefix.starts_with('.')
        {
            return Err(format!(
                "overlay-netns-prefix: {overlay_netns_prefix:?} cannot start a namespace name (at most 32 characters, no '/', spaces, or a leading '.')"
            ));
        }
        if let Some(t) = &self.manager_token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("manager-token: visible ASCII characters only, not empty".into());
            }
        }
        Ok(Config {
            manager_token: self.manager_token,
            manager_ca: self.manager_ca,
            vip_interface: self.vip_interface,
            overlay_netns_prefix,
            manager,
            node,
            http_listen,
            report_interval: duration(
                "report-interval",
                self.report_interval.as_deref(),
                Duration::from_secs(1),
            )?,
            connect_timeout: duration(
                "connect-timeout",
                self.connect_timeout.as_deref(),
                Duration::from_secs(1),
            )?,
            udp_idle_timeout: duration(
                "udp-idle-timeout",
                self.udp_idle_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
        })
    }
}

/// A Linux interface name: 1 to 15 bytes, none of `/`, `:`, whitespace, not `.` or `..`.
pub fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Administrative state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Active,
    /// No new connections; established ones are closed at `started_ms + drain_secs`.
    Draining {
        started_ms: u64,
    },
}

/// One backend of a VIP (desired state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// 1..=256 (0 acts as drained for scheduling).
    pub weight: u32,
    pub max_conns: Option<u32>,
    pub state: BackendState,
}

/// One VIP (desired state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    pub addr: SocketAddr,
    pub proto: Proto,
    pub algo: Algo,
    /// Client-IP persistence (0: off).
    pub persist_secs: u64,
    /// How long established connections of a drained or removed backend may go on.
    pub drain_secs: u64,
    /// Send a PROXY protocol v2 header to the backend first.
    pub proxy_protocol: bool,
    pub check: CheckParams,
    pub backends: Vec<BackendConfig>,
    /// The overlay network the VIP lives on (None: the host's own networks).
    pub network: Option<String>,
}

impl VipConfig {
    /// The listener (address, protocol) of this VIP: a change needs a new socket.
    pub fn listen_key(&self) -> (SocketAddr, Proto, Option<String>) {
        (self.addr, self.proto, self.network.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FileConfig {
        FileConfig {
            node: Some("h1".into()),
            ..FileConfig::default()
        }
    }

    #[test]
    fn defaults() {
        let c = base().resolve().unwrap();
        assert_eq!(c.manager, vec!["http://127.0.0.1:7700".to_string()]);
        assert_eq!(c.http_listen, Some("127.0.0.1:7950".parse().unwrap()));
        assert_eq!(c.report_interval, Duration::from_secs(1));
        assert_eq!(c.udp_idle_timeout, Duration::from_secs(30));
    }

    #[test]
    fn errors_name_the_key() {
        let e = FileConfig {
            node: Some("bad name".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("node:"), "{e}");
        let e = FileConfig {
            http_listen: Some("nowhere".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("http-listen:"), "{e}");
        let e = FileConfig {
            manager: Some("ftp://x".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("manager:"), "{e}");
        let e = FileConfig {
            connect_timeout: Some("0s".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("connect-timeout:"), "{e}");
        for bad in ["", "a/b", "eth0:1", "sixteen-chars-xx", "a b", ".."] {
            let e = FileConfig {
                vip_interface: Some(bad.into()),
                ..base()
            }
            .resolve()
            .unwrap_err();
            assert!(e.starts_with("vip-interface:"), "{bad:?}: {e}");
        }
        assert_eq!(base().resolve().unwrap().vip_interface, None);
    }

    #[test]
    fn flags_win_over_file_and_file_parses() {
        let file: FileConfig =
            toml::from_str("node = \"a\"\nhttp-listen = \"none\"\nreport-interval = \"250ms\"\n")
                .unwrap();
        let c = file
            .overlay(FileConfig {
                node: Some("b".into()),
                ..FileConfig::default()
            })
            .resolve()
            .unwrap();
        assert_eq!(c.node, "b");
        assert_eq!(c.http_listen, None);
        assert_eq!(c.report_interval, Duration::from_millis(250));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        let file: FileConfig = toml::from_str("node = \"a\"\nvip-interface = \"eth0\"\n").unwrap();
        assert_eq!(
            file.clone().resolve().unwrap().vip_interface.as_deref(),
            Some("eth0")
        );
        let c = file
            .overlay(FileConfig {
                vip_interface: Some("br0".into()),
                ..FileConfig::default()
            })
            .resolve()
            .unwrap();
        assert_eq!(c.vip_interface.as_deref(), Some("br0"));
    }
}
