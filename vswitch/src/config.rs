//! vswitch configuration: TOML file (`--config`, kebab-case keys) overlaid by flags.

use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Keys of the TOML file; every one can also be given as a flag (flags win).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub manager: Option<String>,
    pub manager_token: Option<String>,
    pub manager_ca: Option<std::path::PathBuf>,
    pub node: Option<String>,
    pub underlay_ip: Option<String>,
    pub vxlan_port: Option<u16>,
    pub http_listen: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub tx_sockets: Option<usize>,
}

/// The validated configuration vswitch runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// volume-mgr URLs (tried in order).
    pub manager: Vec<String>,
    /// Bearer token sent to volume-mgr.
    pub manager_token: Option<String>,
    /// PEM CA certificate trusted for an https:// volume-mgr.
    pub manager_ca: Option<std::path::PathBuf>,
    pub node: String,
    /// This host's underlay address: VXLAN packets are sent from and to it.
    pub underlay_ip: Ipv4Addr,
    /// UDP port of VXLAN (4789, RFC 7348).
    pub vxlan_port: u16,
    /// `/metrics` and `/healthz`.
    pub http_listen: Option<SocketAddr>,
    pub heartbeat_interval: Duration,
    /// Send sockets (each an ephemeral source port; a flow's hash picks one).
    pub tx_sockets: usize,
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
            underlay_ip: flags.underlay_ip.or(self.underlay_ip),
            vxlan_port: flags.vxlan_port.or(self.vxlan_port),
            http_listen: flags.http_listen.or(self.http_listen),
            heartbeat_interval: flags.heartbeat_interval.or(self.heartbeat_interval),
            tx_sockets: flags.tx_sockets.or(self.tx_sockets),
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
        let underlay_ip: Ipv4Addr = match self.underlay_ip.as_deref() {
            None => return Err("underlay-ip: required (this host's IPv4 address on the underlay network, e.g. --underlay-ip 198.18.0.2)".into()),
            Some(s) => s
                .parse()
                .map_err(|_| format!("underlay-ip: {s:?} is not an IPv4 address"))?,
        };
        if underlay_ip.is_unspecified() || underlay_ip.is_multicast() || underlay_ip.is_broadcast()
        {
            return Err(format!(
                "underlay-ip: {underlay_ip} cannot be a VTEP address (unicast IPv4 needed)"
            ));
        }
        let vxlan_port = self.vxlan_port.unwrap_or(crate::vxlan::VXLAN_PORT);
        if vxlan_port == 0 {
            return Err("vxlan-port: must be 1..=65535".into());
        }
        let http_listen = match self.http_listen.as_deref() {
            Some("") | Some("none") => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| format!("http-listen: {s:?} is not an IP:PORT address"))?,
            ),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 7900))),
        };
        let heartbeat_interval = match self.heartbeat_interval.as_deref() {
            Some(s) => volume_mgr::humantime_serde::parse(s)
                .map_err(|e| format!("heartbeat-interval: {e}"))?,
            None => Duration::from_secs(1),
        };
        if heartbeat_interval.is_zero() {
            return Err("heartbeat-interval: must be more than 0".into());
        }
        let tx_sockets = self.tx_sockets.unwrap_or(8);
        if !(1..=64).contains(&tx_sockets) {
            return Err(format!("tx-sockets: must be 1..=64, got {tx_sockets}"));
        }
        let manager: Vec<String> = self
            .manager
            .as_deref()
            .unwrap_or("http://127.0.0.1:7700")
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if manager.is_empty() {
            return Err("manager: no URL given".into());
        }
        if let Some(bad) = manager
            .iter()
            .find(|m| !m.starts_with("http://") && !m.starts_with("https://"))
        {
            return Err(format!("manager: {bad:?} is not a URL (http://HOST:PORT)"));
        }
        if let Some(t) = &self.manager_token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("manager-token: visible ASCII characters only, not empty".into());
            }
        }
        Ok(Config {
            manager_token: self.manager_token,
            manager_ca: self.manager_ca,
            manager,
            node,
            underlay_ip,
            vxlan_port,
            http_listen,
            heartbeat_interval,
            tx_sockets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FileConfig {
        FileConfig {
            node: Some("h1".into()),
            underlay_ip: Some("198.18.0.2".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let c = base().resolve().unwrap();
        assert_eq!(c.vxlan_port, 4789);
        assert_eq!(c.manager, vec!["http://127.0.0.1:7700".to_string()]);
        assert_eq!(c.http_listen, Some("127.0.0.1:7900".parse().unwrap()));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
    }

    #[test]
    fn errors_name_the_key() {
        let e = FileConfig {
            underlay_ip: None,
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("underlay-ip: required"), "{e}");
        let e = FileConfig {
            underlay_ip: Some("x".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.contains("not an IPv4"), "{e}");
        let e = FileConfig {
            vxlan_port: Some(0),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("vxlan-port"), "{e}");
        let e = FileConfig {
            node: Some("a b".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("node"), "{e}");
        let e = FileConfig {
            manager: Some("localhost:7700".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("manager"), "{e}");
        let e = FileConfig {
            http_listen: Some("nope".into()),
            ..base()
        }
        .resolve()
        .unwrap_err();
        assert!(e.starts_with("http-listen"), "{e}");
    }

    #[test]
    fn flags_win_over_file() {
        let file: FileConfig =
            toml::from_str("node = \"a\"\nunderlay-ip = \"198.18.0.9\"\nvxlan-port = 4790\n")
                .unwrap();
        let c = file
            .overlay(FileConfig {
                node: Some("b".into()),
                ..Default::default()
            })
            .resolve()
            .unwrap();
        assert_eq!(c.node, "b");
        assert_eq!(c.vxlan_port, 4790);
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }
}
