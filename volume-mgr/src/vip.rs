//! Load-balanced VIP rules as pure code (no store, no sockets): the checks the manager applies
//! to VIPs, their health checks and backends, the `--check` syntax of the CLI, and which
//! instance reports are fresh. The HTTP handlers (`server::vip`) and fabctl call these.
//!
//! Addresses are stored canonical (`SocketAddr`'s own form: `192.0.2.10:80`,
//! `[2001:db8::1]:80`), so one address has one spelling in the store, in uniqueness checks and
//! in lb-vip's reports.

use crate::api;
use crate::net::{NetError, Subnet};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Largest Maglev lookup table accepted: the largest prime below 2^20 (4 MiB of table per
/// VIP in lb-vip).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 1_048_573;
/// Most backends one VIP may have.
pub const MAX_BACKENDS: usize = 1024;
/// Health check interval bounds (ms).
pub const CHECK_INTERVAL_MIN_MS: u32 = 100;
pub const CHECK_INTERVAL_MAX_MS: u32 = 3_600_000;
/// Shortest health check timeout (ms); the longest is the interval.
pub const CHECK_TIMEOUT_MIN_MS: u32 = 10;
/// Largest `rise` / `fall`.
pub const CHECK_COUNT_MAX: u32 = 100;
/// Longest HTTP check path.
pub const HTTP_PATH_MAX: usize = 1024;

/// Why a VIP, backend or health check is refused (each is a 400 with this line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("invalid vip name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("{what} {value:?} is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)")]
    NotAddr { what: &'static str, value: String },
    #[error("{what} {addr} has port 0: give the port it listens on (1 to 65535)")]
    PortZero {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("{what} {addr}: {ip} is not a unicast address", ip = addr.ip())]
    NotUnicast {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("weight {0} is out of range: must be 1 to {max}", max = api::VIP_WEIGHT_MAX)]
    WeightRange(u32),
    #[error("max_conns must be at least 1 (leave it out for no limit)")]
    MaxConnsZero,
    #[error("{what} {value} is out of range: must be 0 to {max} seconds", max = api::VIP_MAX_SECS)]
    SecsRange { what: &'static str, value: u32 },
    #[error(
        "maglev_table_size {0} is not a prime from {min} to {MAX_MAGLEV_TABLE_SIZE} (default {default})",
        min = api::VIP_MIN_MAGLEV_TABLE_SIZE,
        default = api::VIP_DEFAULT_MAGLEV_TABLE_SIZE
    )]
    MaglevSize(u32),
    #[error("check {0:?} is not tcp or http:/PATH[:STATUS] (e.g. http:/healthz:200)")]
    CheckSpec(String),
    #[error("http_path and http_status are for http checks only")]
    CheckHttpFieldsOnTcp,
    #[error("an http check needs http_path (e.g. /healthz)")]
    CheckNoPath,
    #[error("http_path {0:?} must start with / and be printable ASCII without spaces, at most {HTTP_PATH_MAX} characters")]
    CheckPath(String),
    #[error("http_status {0} is out of range: must be 100 to 599")]
    CheckStatus(u16),
    #[error("check interval_ms {0} is out of range: must be {CHECK_INTERVAL_MIN_MS} to {CHECK_INTERVAL_MAX_MS}")]
    CheckInterval(u32),
    #[error("check timeout_ms {timeout} is out of range: must be {CHECK_TIMEOUT_MIN_MS} to the interval ({interval} ms)")]
    CheckTimeout { timeout: u32, interval: u32 },
    #[error("check {what} {value} is out of range: must be 1 to {CHECK_COUNT_MAX}")]
    CheckCount { what: &'static str, value: u32 },
    #[error("vip address {0} is not IPv4: overlay networks are IPv4")]
    NotIpv4OnNetwork(IpAddr),
    #[error("vip address {ip} is the gateway of network {network}")]
    Gateway { ip: IpAddr, network: String },
    /// Outside the network's subnet, or one of its reserved addresses.
    #[error(transparent)]
    Subnet(#[from] NetError),
    #[error("ttl_ms {0} is out of range: must be {min} to {max}", min = api::VIP_LEASE_TTL_MIN_MS, max = api::VIP_LEASE_TTL_MAX_MS)]
    LeaseTtl(u64),
    #[error("vip {vip} has {have} backends: at most {max} (maglev_table_size {table} must exceed the backend count, and a vip has at most {MAX_BACKENDS})")]
    TooManyBackends {
        vip: String,
        have: usize,
        max: usize,
        table: u32,
    },
}

/// VIP names follow the volume name rules.
pub fn check_vip_name(name: &str) -> Result<(), VipError> {
    api::validate_volume_name(name).map_err(|e| VipError::Name {
        name: name.to_string(),
        reason: e.trim_start_matches("volume name ").to_string(),
    })
}

/// An `IP:PORT` that something listens on: port not 0, a unicast IP (not unspecified,
/// multicast or the IPv4 broadcast).
pub fn parse_addr(what: &'static str, s: &str) -> Result<SocketAddr, VipError> {
    let addr: SocketAddr = s.parse().map_err(|_| VipError::NotAddr {
        what,
        value: s.to_string(),
    })?;
    if addr.port() == 0 {
        return Err(VipError::PortZero { what, addr });
    }
    let unicast = match addr.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    };
    if !unicast {
        return Err(VipError::NotUnicast { what, addr });
    }
    Ok(addr)
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn check_secs(what: &'static str, value: u32) -> Result<u32, VipError> {
    if value > api::VIP_MAX_SECS {
        return Err(VipError::SecsRange { what, value });
    }
    Ok(value)
}

/// Checks a health check and returns it as stored (`http_status` 200 for http when not
/// given).
pub fn check_health(c: &api::HealthCheck) -> Result<api::HealthCheck, VipError> {
    let mut out = c.clone();
    match c.kind {
        api::CheckKind::Tcp => {
            if c.http_path.is_some() || c.http_status.is_some() {
                return Err(VipError::CheckHttpFieldsOnTcp);
            }
        }
        api::CheckKind::Http => {
            let path = c.http_path.as_deref().ok_or(VipError::CheckNoPath)?;
            check_http_path(path)?;
            let status = c.http_status.unwrap_or(200);
            if !(100..=599).contains(&status) {
                return Err(VipError::CheckStatus(status));
            }
            out.http_status = Some(status);
        }
    }
    if !(CHECK_INTERVAL_MIN_MS..=CHECK_INTERVAL_MAX_MS).contains(&c.interval_ms) {
        return Err(VipError::CheckInterval(c.interval_ms));
    }
    if !(CHECK_TIMEOUT_MIN_MS..=c.interval_ms).contains(&c.timeout_ms) {
        return Err(VipError::CheckTimeout {
            timeout: c.timeout_ms,
            interval: c.interval_ms,
        });
    }
    for (what, value) in [("rise", c.rise), ("fall", c.fall)] {
        if !(1..=CHECK_COUNT_MAX).contains(&value) {
            return Err(VipError::CheckCount { what, value });
        }
    }
    Ok(out)
}

/// An HTTP check path: `/`, then printable ASCII without spaces (it goes into a request line
/// as it is).
fn check_http_path(p: &str) -> Result<(), VipError> {
    let ok =
        p.starts_with('/') && p.len() <= HTTP_PATH_MAX && p.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(VipError::CheckPath(p.to_string()))
    }
}

/// The CLI's `--check` value: `tcp`, `http` (path `/`), `http:/PATH` or `http:/PATH:STATUS`
/// (a last `:` followed by three digits is the status). Returns the check with the defaults
/// for everything else; the result still goes through [`check_health`] on the manager.
pub fn parse_check_spec(s: &str) -> Result<api::HealthCheck, VipError> {
    let spec = || VipError::CheckSpec(s.to_string());
    if s == "tcp" {
        return Ok(api::HealthCheck::default());
    }
    let rest = if s == "http" {
        "/"
    } else {
        s.strip_prefix("http:").ok_or_else(spec)?
    };
    let (path, status) = match rest.rsplit_once(':') {
        Some((p, st)) if st.len() == 3 && st.bytes().all(|b| b.is_ascii_digit()) => {
            (p, Some(st.parse::<u16>().map_err(|_| spec())?))
        }
        _ => (rest, None),
    };
    if !path.starts_with('/') {
        return Err(spec());
    }
    let c = api::HealthCheck {
        kind: api::CheckKind::Http,
        http_path: Some(path.to_string()),
        http_status: status,
        ..Default::default()
    };
    check_health(&c)
}

/// The `--check` form of a stored check (`tcp`, `http:/healthz:200`).
pub fn check_spec(c: &api::HealthCheck) -> String {
    match c.kind {
        api::CheckKind::Tcp => "tcp".into(),
        api::CheckKind::Http => format!(
            "http:{}:{}",
            c.http_path.as_deref().unwrap_or("/"),
            c.http_status.unwrap_or(200)
        ),
    }
}

/// Checks a `CreateVip` on its own (the network and uniqueness need the store) and returns
/// the VIP as stored: canonical address, every default filled in, no backends.
pub fn check_vip(req: &api::CreateVip, created_ms: u64) -> Result<api::Vip, VipError> {
    check_vip_name(&req.name)?;
    let addr = parse_addr("addr", &req.addr)?;
    let persist_secs = check_secs("persist_secs", req.persist_secs.unwrap_or(0))?;
    let drain_secs = check_secs(
        "drain_secs",
        req.drain_secs.unwrap_or(api::VIP_DEFAULT_DRAIN_SECS),
    )?;
    let check = check_health(&req.check.clone().unwrap_or_default())?;
    let maglev_table_size = req
        .maglev_table_size
        .unwrap_or(api::VIP_DEFAULT_MAGLEV_TABLE_SIZE);
    if !(api::VIP_MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE).contains(&maglev_table_size)
        || !is_prime(maglev_table_size)
    {
        return Err(VipError::MaglevSize(maglev_table_size));
    }
    Ok(api::Vip {
        name: req.name.clone(),
        addr: addr.to_string(),
        proto: req.proto,
        network: req.network.clone(),
        algo: req.algo.unwrap_or_default(),
        persist_secs,
        drain_secs,
        check,
        proxy_protocol: req.proxy_protocol.unwrap_or(false),
        maglev_table_size,
        backends: Vec::new(),
        created_ms,
        reports: BTreeMap::new(),
        lease: None,
    })
}

/// A VIP on an overlay network: an IPv4 address inside the network's subnet that is none of
/// its network, broadcast, DHCP server or gateway addresses.
pub fn check_vip_on_network(
    addr: SocketAddr,
    network: &str,
    subnet: Subnet,
    gateway: Option<&str>,
) -> Result<(), VipError> {
    let IpAddr::V4(ip) = addr.ip() else {
        return Err(VipError::NotIpv4OnNetwork(addr.ip()));
    };
    crate::net::check_in_subnet("vip address", ip, subnet)?;
    if gateway.and_then(|g| g.parse().ok()) == Some(ip) {
        return Err(VipError::Gateway {
            ip: addr.ip(),
            network: network.to_string(),
        });
    }
    Ok(())
}

/// Checks an `AddBackend` and returns the backend as stored (canonical address, weight 1 by
/// default, active).
pub fn check_backend(req: &api::AddBackend) -> Result<api::Backend, VipError> {
    let addr = parse_addr("backend", &req.addr)?;
    let weight = req.weight.unwrap_or(1);
    if !(1..=api::VIP_WEIGHT_MAX).contains(&weight) {
        return Err(VipError::WeightRange(weight));
    }
    if req.max_conns == Some(0) {
        return Err(VipError::MaxConnsZero);
    }
    Ok(api::Backend {
        addr: addr.to_string(),
        weight,
        max_conns: req.max_conns,
        state: api::BackendState::Active,
        drain_started_ms: None,
    })
}

/// Most backends `vip` may have: fewer than its Maglev table has slots, and `MAX_BACKENDS`.
pub fn max_backends(vip: &api::Vip) -> usize {
    (vip.maglev_table_size as usize - 1).min(MAX_BACKENDS)
}

/// Whether one more backend fits.
pub fn check_backend_room(vip: &api::Vip) -> Result<(), VipError> {
    let max = max_backends(vip);
    if vip.backends.len() >= max {
        return Err(VipError::TooManyBackends {
            vip: vip.name.clone(),
            have: vip.backends.len(),
            max,
            table: vip.maglev_table_size,
        });
    }
    Ok(())
}

/// The index of the backend at `addr` (compared as addresses, so any spelling finds it).
pub fn find_backend(vip: &api::Vip, addr: SocketAddr) -> Option<usize> {
    vip.backends
        .iter()
        .position(|b| b.addr.parse::<SocketAddr>() == Ok(addr))
}

/// Sets backend `i` draining from `now_ms`; false (nothing changed) if it already is.
pub fn drain(vip: &mut api::Vip, i: usize, now_ms: u64) -> bool {
    let Some(b) = vip.backends.get_mut(i) else {
        return false;
    };
    if b.state == api::BackendState::Draining {
        return false;
    }
    b.state = api::BackendState::Draining;
    b.drain_started_ms = Some(now_ms);
    true
}

/// Reports of the instances by node, each with the time it was received (ms).
pub type Reports = BTreeMap<String, (u64, api::VipReport)>;

/// The reports (by node) received less than `max_age_ms` before `now_ms`.
pub fn fresh_reports(
    reports: &Reports,
    now_ms: u64,
    max_age_ms: u64,
) -> BTreeMap<String, api::VipReport> {
    reports
        .iter()
        .filter(|(_, (t, _))| now_ms.saturating_sub(*t) < max_age_ms)
        .map(|(n, (_, r))| (n.clone(), r.clone()))
        .collect()
}

/// A lease's `ttl_ms`: `VIP_LEASE_TTL_MIN_MS..=VIP_LEASE_TTL_MAX_MS`.
pub fn check_lease_ttl(ttl_ms: u64) -> Result<u64, VipError> {
    if !(api::VIP_LEASE_TTL_MIN_MS..=api::VIP_LEASE_TTL_MAX_MS).contains(&ttl_ms) {
        return Err(VipError::LeaseTtl(ttl_ms));
    }
    Ok(ttl_ms)
}

/// A granted lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub lease: api::VipLease,
    /// A new tenure (first holder, another node, or the same node after expiry or release),
    /// as opposed to a renewal.
    pub new_holder: bool,
}

/// Why a lease request is refused (409).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another node holds it (`held`).
    Held(api::VipLease),
    /// A renewal of `epoch` when the node no longer holds that epoch (`lease_lost`): it
    /// expired or was released (`current` is the record, if any, possibly held by another).
    Lost {
        epoch: u64,
        current: Option<api::VipLease>,
    },
}

/// Node `node` asks for the lease of `vip` (currently `cur`) for `ttl_ms` at `now_ms`.
/// Without `renew_epoch`: granted when nobody holds it (no lease, or it expired or was
/// released) with the next epoch, renewed with the same epoch when `node` holds it, else
/// `Held`. With `renew_epoch` (the caller believes it holds that epoch): renewed only when
/// `node` still holds exactly that epoch, else `Lost` — so a renewal that arrives late
/// (delayed in the network past a release or an expiry) never starts a tenure nobody knows
/// of.
pub fn acquire_lease(
    vip: &str,
    cur: Option<&api::VipLease>,
    node: &str,
    renew_epoch: Option<u64>,
    ttl_ms: u64,
    now_ms: u64,
) -> Result<Granted, Refusal> {
    let expires_ms = now_ms.saturating_add(ttl_ms);
    let mine = cur.filter(|l| l.is_held(now_ms) && l.holder == node);
    match (mine, renew_epoch) {
        (Some(l), Some(e)) if l.epoch != e => Err(Refusal::Lost {
            epoch: e,
            current: cur.cloned(),
        }),
        (Some(l), _) => Ok(Granted {
            lease: api::VipLease {
                expires_ms: expires_ms.max(l.expires_ms),
                ..l.clone()
            },
            new_holder: false,
        }),
        (None, Some(e)) => Err(Refusal::Lost {
            epoch: e,
            current: cur.cloned(),
        }),
        (None, None) => match cur {
            Some(l) if l.is_held(now_ms) => Err(Refusal::Held(l.clone())),
            _ => Ok(Granted {
                lease: api::VipLease {
                    vip: vip.to_string(),
                    holder: node.to_string(),
                    epoch: cur.map_or(0, |l| l.epoch).saturating_add(1),
                    expires_ms,
                },
                new_holder: true,
            }),
        },
    }
}

/// The 409 line of a refusal to `node` (and its code: `held` or `lease_lost`).
pub fn refusal_message(vip: &str, node: &str, r: &Refusal, now_ms: u64) -> (&'static str, String) {
    match r {
        Refusal::Held(l) => ("held", held_message(l, now_ms)),
        Refusal::Lost { epoch, current } => {
            let now = match current {
                Some(l) if l.is_held(now_ms) => format!(
                    "held by {} (epoch {}) for {} ms more",
                    l.holder,
                    l.epoch,
                    l.expires_ms.saturating_sub(now_ms)
                ),
                _ => "held by nobody".to_string(),
            };
            (
                "lease_lost",
                format!("{node} no longer holds vip {vip} with epoch {epoch} (it expired or was released; now {now}): acquire it again without an epoch"),
            )
        }
    }
}

/// Node `node` gives the lease up at `now_ms`: `Ok(Some(lease))` to store (the holder's lease,
/// ended now, epoch kept so the next holder's is higher), `Ok(None)` when nobody holds it
/// (nothing to do), `Err` with the lease when another node holds it.
pub fn release_lease(
    cur: Option<&api::VipLease>,
    node: &str,
    now_ms: u64,
) -> Result<Option<api::VipLease>, api::VipLease> {
    match cur {
        Some(l) if l.is_held(now_ms) && l.holder == node => Ok(Some(api::VipLease {
            expires_ms: now_ms,
            ..l.clone()
        })),
        Some(l) if l.is_held(now_ms) => Err(l.clone()),
        _ => Ok(None),
    }
}

/// The 409 `held` line.
pub fn held_message(l: &api::VipLease, now_ms: u64) -> String {
    format!(
        "vip {} is held by {} (epoch {}) until {} ms since the epoch, {} ms from now",
        l.vip,
        l.holder,
        l.epoch,
        l.expires_ms,
        l.expires_ms.saturating_sub(now_ms)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{BackendState, CheckKind, HealthCheck, VipAlgo, VipProto};

    fn create() -> api::CreateVip {
        api::CreateVip {
            name: "web".into(),
            addr: "192.0.2.10:80".into(),
            proto: VipProto::Tcp,
            network: None,
            algo: None,
            persist_secs: None,
            drain_secs: None,
            check: None,
            proxy_protocol: None,
            maglev_table_size: None,
        }
    }

    fn err(f: &dyn Fn(&mut api::CreateVip)) -> String {
        let mut r = create();
        f(&mut r);
        check_vip(&r, 0).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_filled() {
        let v = check_vip(&create(), 7).unwrap();
        assert_eq!(v.addr, "192.0.2.10:80");
        assert_eq!(v.algo, VipAlgo::Rr);
        assert_eq!((v.persist_secs, v.drain_secs), (0, 30));
        assert_eq!(v.check, HealthCheck::default());
        assert_eq!(
            (
                v.check.interval_ms,
                v.check.timeout_ms,
                v.check.rise,
                v.check.fall
            ),
            (2000, 1000, 2, 3)
        );
        assert!(!v.proxy_protocol);
        assert_eq!(v.maglev_table_size, 65537);
        assert!(v.backends.is_empty() && v.reports.is_empty());
        assert_eq!(v.created_ms, 7);
        // Explicit values are kept; IPv6 is canonical.
        let mut r = create();
        r.addr = "[2001:DB8:0:0::1]:443".into();
        r.proto = VipProto::Udp;
        r.algo = Some(VipAlgo::Maglev);
        r.persist_secs = Some(86400);
        r.drain_secs = Some(0);
        r.proxy_protocol = Some(true);
        r.maglev_table_size = Some(7);
        r.check = Some(HealthCheck {
            kind: CheckKind::Http,
            http_path: Some("/healthz?x=1".into()),
            ..Default::default()
        });
        let v = check_vip(&r, 0).unwrap();
        assert_eq!(v.addr, "[2001:db8::1]:443");
        assert_eq!((v.proto, v.algo), (VipProto::Udp, VipAlgo::Maglev));
        assert_eq!((v.persist_secs, v.drain_secs), (86400, 0));
        assert!(v.proxy_protocol);
        assert_eq!(v.maglev_table_size, 7);
        assert_eq!(v.check.http_status, Some(200));
    }

    #[test]
    fn vip_errors() {
        assert_eq!(
            err(&|r| r.name = "a b".into()),
            "invalid vip name \"a b\": contains ' '; allowed: A-Z a-z 0-9 . _ -"
        );
        assert!(err(&|r| r.name = String::new()).contains("must be 1 to 64 characters"));
        assert_eq!(
            err(&|r| r.addr = "192.0.2.10".into()),
            "addr \"192.0.2.10\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)"
        );
        for a in ["web:80", "192.0.2.10:", "192.0.2.10:65536", "::1:80", ""] {
            assert!(
                err(&|r| r.addr = a.into()).contains("is not an IP:PORT address"),
                "{a}"
            );
        }
        assert_eq!(
            err(&|r| r.addr = "192.0.2.10:0".into()),
            "addr 192.0.2.10:0 has port 0: give the port it listens on (1 to 65535)"
        );
        for a in [
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::]:80",
            "[ff02::1]:80",
        ] {
            assert!(
                err(&|r| r.addr = a.into()).contains("is not a unicast address"),
                "{a}"
            );
        }
        assert_eq!(
            err(&|r| r.addr = "0.0.0.0:80".into()),
            "addr 0.0.0.0:80: 0.0.0.0 is not a unicast address"
        );
        assert_eq!(
            err(&|r| r.persist_secs = Some(86401)),
            "persist_secs 86401 is out of range: must be 0 to 86400 seconds"
        );
        assert_eq!(
            err(&|r| r.drain_secs = Some(u32::MAX)),
            "drain_secs 4294967295 is out of range: must be 0 to 86400 seconds"
        );
        for m in [0, 1, 5, 8, 65536, 65535, 1_048_583, u32::MAX] {
            assert_eq!(
                err(&|r| r.maglev_table_size = Some(m)),
                format!("maglev_table_size {m} is not a prime from 7 to 1048573 (default 65537)")
            );
        }
        assert_eq!(
            err(&|r| r.check = Some(HealthCheck {
                rise: 0,
                ..Default::default()
            })),
            "check rise 0 is out of range: must be 1 to 100"
        );
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537) && is_prime(MAX_MAGLEV_TABLE_SIZE) && is_prime(4_294_967_291));
        assert!(!is_prime(65535) && !is_prime(1 << 20) && !is_prime(u32::MAX));
        // MAX_MAGLEV_TABLE_SIZE is the largest prime below 2^20.
        assert!(((MAX_MAGLEV_TABLE_SIZE + 1)..(1 << 20)).all(|n| !is_prime(n)));
    }

    #[test]
    fn health_checks() {
        let chk = |f: &dyn Fn(&mut HealthCheck)| {
            let mut c = HealthCheck {
                kind: CheckKind::Http,
                http_path: Some("/".into()),
                ..Default::default()
            };
            f(&mut c);
            check_health(&c).map_err(|e| e.to_string())
        };
        assert_eq!(chk(&|_| {}).unwrap().http_status, Some(200));
        assert_eq!(
            chk(&|c| c.http_status = Some(204)).unwrap().http_status,
            Some(204)
        );
        assert_eq!(
            chk(&|c| c.http_path = None).unwrap_err(),
            "an http check needs http_path (e.g. /healthz)"
        );
        for p in ["healthz", "", "/a b", "/\u{e9}", "/a\r\nHost: x"] {
            assert_eq!(
                chk(&|c| c.http_path = Some(p.into())).unwrap_err(),
                format!("http_path {p:?} must start with / and be printable ASCII without spaces, at most 1024 characters")
            );
        }
        assert!(chk(&|c| c.http_path = Some(format!("/{}", "a".repeat(1024)))).is_err());
        assert!(chk(&|c| c.http_path = Some(format!("/{}", "a".repeat(1023)))).is_ok());
        for s in [0, 99, 600, u16::MAX] {
            assert_eq!(
                chk(&|c| c.http_status = Some(s)).unwrap_err(),
                format!("http_status {s} is out of range: must be 100 to 599")
            );
        }
        for (f, want) in [
            (
                &(|c: &mut HealthCheck| {
                    c.kind = CheckKind::Tcp;
                }) as &dyn Fn(&mut HealthCheck),
                "http_path and http_status are for http checks only",
            ),
            (
                &|c: &mut HealthCheck| c.interval_ms = 99,
                "check interval_ms 99 is out of range: must be 100 to 3600000",
            ),
            (
                &|c: &mut HealthCheck| c.interval_ms = 3_600_001,
                "check interval_ms 3600001 is out of range: must be 100 to 3600000",
            ),
            (
                &|c: &mut HealthCheck| c.timeout_ms = 9,
                "check timeout_ms 9 is out of range: must be 10 to the interval (2000 ms)",
            ),
            (
                &|c: &mut HealthCheck| c.timeout_ms = 2001,
                "check timeout_ms 2001 is out of range: must be 10 to the interval (2000 ms)",
            ),
            (
                &|c: &mut HealthCheck| c.rise = 101,
                "check rise 101 is out of range: must be 1 to 100",
            ),
            (
                &|c: &mut HealthCheck| c.fall = 0,
                "check fall 0 is out of range: must be 1 to 100",
            ),
        ] {
            assert_eq!(chk(f).unwrap_err(), want);
        }
        // A tcp check with a status only is refused too.
        let c = HealthCheck {
            http_status: Some(200),
            ..Default::default()
        };
        assert_eq!(check_health(&c), Err(VipError::CheckHttpFieldsOnTcp));
        assert_eq!(
            check_health(&HealthCheck::default()),
            Ok(HealthCheck::default())
        );
    }

    #[test]
    fn check_specs() {
        assert_eq!(parse_check_spec("tcp").unwrap(), HealthCheck::default());
        let http = |p: &str, s: Option<u16>| HealthCheck {
            kind: CheckKind::Http,
            http_path: Some(p.into()),
            http_status: s.or(Some(200)),
            ..Default::default()
        };
        assert_eq!(parse_check_spec("http").unwrap(), http("/", None));
        assert_eq!(parse_check_spec("http:/").unwrap(), http("/", None));
        assert_eq!(
            parse_check_spec("http:/healthz").unwrap(),
            http("/healthz", None)
        );
        assert_eq!(
            parse_check_spec("http:/healthz:204").unwrap(),
            http("/healthz", Some(204))
        );
        // A colon not followed by a three-digit status belongs to the path.
        assert_eq!(parse_check_spec("http:/a:b").unwrap(), http("/a:b", None));
        assert_eq!(
            parse_check_spec("http:/a:2000").unwrap(),
            http("/a:2000", None)
        );
        assert_eq!(
            parse_check_spec("http:/a:b:301").unwrap(),
            http("/a:b", Some(301))
        );
        for s in [
            "",
            "icmp",
            "tcp:80",
            "http:",
            "http:healthz",
            "http:healthz:200",
            "HTTP:/x",
            "http:/:x ",
        ] {
            let e = parse_check_spec(s).unwrap_err().to_string();
            assert!(
                e == format!(
                    "check {s:?} is not tcp or http:/PATH[:STATUS] (e.g. http:/healthz:200)"
                ) || e.starts_with("http_path"),
                "{s:?}: {e}"
            );
        }
        assert_eq!(
            parse_check_spec("http:/x:999").unwrap_err().to_string(),
            "http_status 999 is out of range: must be 100 to 599"
        );
        // Round trip through the stored form.
        for s in ["tcp", "http:/healthz:204", "http:/a:b:200"] {
            assert_eq!(check_spec(&parse_check_spec(s).unwrap()), s);
        }
    }

    #[test]
    fn vips_on_networks() {
        let sn = Subnet::parse("10.0.0.0/24").unwrap();
        let on = |a: &str, gw: Option<&str>| {
            check_vip_on_network(a.parse().unwrap(), "blue", sn, gw).map_err(|e| e.to_string())
        };
        assert!(on("10.0.0.20:80", None).is_ok());
        assert!(on("10.0.0.1:80", None).is_ok());
        assert_eq!(
            on("10.0.0.1:80", Some("10.0.0.1")).unwrap_err(),
            "vip address 10.0.0.1 is the gateway of network blue"
        );
        assert_eq!(
            on("10.0.1.20:80", None).unwrap_err(),
            "vip address 10.0.1.20 is outside subnet 10.0.0.0/24"
        );
        assert_eq!(
            on("10.0.0.0:80", None).unwrap_err(),
            "vip address 10.0.0.0 is the network address of subnet 10.0.0.0/24"
        );
        assert_eq!(
            on("10.0.0.255:80", None).unwrap_err(),
            "vip address 10.0.0.255 is the broadcast address of subnet 10.0.0.0/24"
        );
        assert!(on("10.0.0.254:80", None).unwrap_err().starts_with(
            "vip address 10.0.0.254 is the DHCP server address of subnet 10.0.0.0/24"
        ));
        assert_eq!(
            on("[2001:db8::1]:80", None).unwrap_err(),
            "vip address 2001:db8::1 is not IPv4: overlay networks are IPv4"
        );
    }

    #[test]
    fn backends() {
        let add = |addr: &str, weight, max_conns| {
            check_backend(&api::AddBackend {
                addr: addr.into(),
                weight,
                max_conns,
            })
            .map_err(|e| e.to_string())
        };
        let b = add("10.0.0.5:8080", None, None).unwrap();
        assert_eq!(
            b,
            api::Backend {
                addr: "10.0.0.5:8080".into(),
                weight: 1,
                max_conns: None,
                state: BackendState::Active,
                drain_started_ms: None,
            }
        );
        let b = add("[::1]:80", Some(256), Some(1)).unwrap();
        assert_eq!(
            (b.addr.as_str(), b.weight, b.max_conns),
            ("[::1]:80", 256, Some(1))
        );
        for w in [0, 257, u32::MAX] {
            assert_eq!(
                add("10.0.0.5:80", Some(w), None).unwrap_err(),
                format!("weight {w} is out of range: must be 1 to 256")
            );
        }
        assert_eq!(
            add("10.0.0.5:80", None, Some(0)).unwrap_err(),
            "max_conns must be at least 1 (leave it out for no limit)"
        );
        assert_eq!(
            add("10.0.0.5:0", None, None).unwrap_err(),
            "backend 10.0.0.5:0 has port 0: give the port it listens on (1 to 65535)"
        );
        assert_eq!(
            add("10.0.0.5", None, None).unwrap_err(),
            "backend \"10.0.0.5\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)"
        );
        assert!(add("0.0.0.0:80", None, None)
            .unwrap_err()
            .contains("not a unicast address"));
    }

    #[test]
    fn backend_room_lookup_and_drain() {
        let mut r = create();
        r.maglev_table_size = Some(7);
        let mut v = check_vip(&r, 0).unwrap();
        for i in 0..6 {
            check_backend_room(&v).unwrap();
            v.backends.push(
                check_backend(&api::AddBackend {
                    addr: format!("10.0.0.{}:80", i + 1),
                    weight: None,
                    max_conns: None,
                })
                .unwrap(),
            );
        }
        assert_eq!(
            check_backend_room(&v).unwrap_err().to_string(),
            "vip web has 6 backends: at most 6 (maglev_table_size 7 must exceed the backend count, and a vip has at most 1024)"
        );
        assert_eq!(
            max_backends(&check_vip(&create(), 0).unwrap()),
            MAX_BACKENDS
        );
        assert_eq!(find_backend(&v, "10.0.0.3:80".parse().unwrap()), Some(2));
        assert_eq!(find_backend(&v, "10.0.0.3:81".parse().unwrap()), None);
        assert!(drain(&mut v, 2, 1000));
        assert_eq!(v.backends[2].state, BackendState::Draining);
        assert_eq!(v.backends[2].drain_started_ms, Some(1000));
        // Draining again changes nothing (the first start time stays).
        assert!(!drain(&mut v, 2, 2000));
        assert_eq!(v.backends[2].drain_started_ms, Some(1000));
        assert!(!drain(&mut v, 99, 2000));
    }

    #[test]
    fn only_fresh_reports() {
        let r = |holder| api::VipReport {
            holder,
            backends: vec![],
        };
        let mut all = BTreeMap::new();
        all.insert("a".to_string(), (10_000u64, r(true)));
        all.insert("b".to_string(), (14_000u64, r(false)));
        all.insert("c".to_string(), (20_000u64, r(false))); // clock skew: fresh
        let f = fresh_reports(&all, 15_000, 5000);
        assert_eq!(f.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(fresh_reports(&all, 14_999, 5000).len(), 3);
    }

    #[test]
    fn lease_ttl_bounds() {
        assert_eq!(check_lease_ttl(500), Ok(500));
        assert_eq!(check_lease_ttl(60_000), Ok(60_000));
        assert_eq!(check_lease_ttl(499), Err(VipError::LeaseTtl(499)));
        assert_eq!(check_lease_ttl(60_001), Err(VipError::LeaseTtl(60_001)));
        assert_eq!(
            VipError::LeaseTtl(0).to_string(),
            "ttl_ms 0 is out of range: must be 500 to 60000"
        );
    }

    #[test]
    fn lease_acquire_renew_takeover_release() {
        // First holder: epoch 1.
        let g = acquire_lease("web", None, "a", None, 1500, 1000).unwrap();
        assert!(g.new_holder);
        let l = g.lease;
        assert_eq!((l.holder.as_str(), l.epoch, l.expires_ms), ("a", 1, 2500));
        // Another node while it is held: refused with the holder's lease.
        assert_eq!(
            acquire_lease("web", Some(&l), "b", None, 1500, 2499),
            Err(Refusal::Held(l.clone()))
        );
        // The holder renews: same epoch, later expiry (never earlier).
        let r = acquire_lease("web", Some(&l), "a", None, 1500, 2000).unwrap();
        assert!(!r.new_holder);
        assert_eq!((r.lease.epoch, r.lease.expires_ms), (1, 3500));
        let short = acquire_lease("web", Some(&r.lease), "a", None, 500, 2100).unwrap();
        assert_eq!(short.lease.expires_ms, 3500);
        // Expired (now == expires): anyone takes it over with the next epoch.
        let t = acquire_lease("web", Some(&r.lease), "b", None, 1500, 3500).unwrap();
        assert!(t.new_holder);
        assert_eq!((t.lease.holder.as_str(), t.lease.epoch), ("b", 2));
        // The old holder coming back late starts a new tenure too.
        let late = acquire_lease("web", Some(&t.lease), "b", None, 1500, 6000).unwrap();
        assert!(late.new_holder);
        assert_eq!(late.lease.epoch, 3);
        // Release: only the holder; it keeps the epoch and ends now.
        assert_eq!(
            release_lease(Some(&late.lease), "a", 6100),
            Err(late.lease.clone())
        );
        let rel = release_lease(Some(&late.lease), "b", 6100)
            .unwrap()
            .unwrap();
        assert_eq!((rel.epoch, rel.expires_ms), (3, 6100));
        assert!(!rel.is_held(6100));
        assert_eq!(release_lease(Some(&rel), "b", 6200), Ok(None));
        assert_eq!(release_lease(None, "b", 6200), Ok(None));
        let next = acquire_lease("web", Some(&rel), "a", None, 1500, 6200).unwrap();
        assert_eq!(next.lease.epoch, 4);
        assert_eq!(
            held_message(&next.lease, 6700),
            "vip web is held by a (epoch 4) until 7700 ms since the epoch, 1000 ms from now"
        );
    }

    #[test]
    fn renewals_name_their_epoch() {
        let l = acquire_lease("web", None, "a", None, 1500, 1000)
            .unwrap()
            .lease;
        // The holder renewing its epoch: kept.
        let r = acquire_lease("web", Some(&l), "a", Some(1), 1500, 1500).unwrap();
        assert!(!r.new_holder);
        assert_eq!((r.lease.epoch, r.lease.expires_ms), (1, 3000));
        // A renewal of another epoch, or by a node that does not hold it: lost.
        let lost = |epoch, current: &api::VipLease| Refusal::Lost {
            epoch,
            current: Some(current.clone()),
        };
        assert_eq!(
            acquire_lease("web", Some(&r.lease), "a", Some(7), 1500, 1600),
            Err(lost(7, &r.lease))
        );
        assert_eq!(
            acquire_lease("web", Some(&r.lease), "b", Some(1), 1500, 1600),
            Err(lost(1, &r.lease))
        );
        // A late renewal after the lease expired (or was released) starts nothing, although
        // a plain acquire would.
        assert_eq!(
            acquire_lease("web", Some(&r.lease), "a", Some(1), 1500, 3000),
            Err(lost(1, &r.lease))
        );
        let rel = release_lease(Some(&r.lease), "a", 2000).unwrap().unwrap();
        assert_eq!(
            acquire_lease("web", Some(&rel), "a", Some(1), 1500, 2001),
            Err(lost(1, &rel))
        );
        assert_eq!(
            acquire_lease("web", None, "a", Some(1), 1500, 2001),
            Err(Refusal::Lost {
                epoch: 1,
                current: None
            })
        );
        assert_eq!(
            acquire_lease("web", Some(&rel), "a", None, 1500, 2001)
                .unwrap()
                .lease
                .epoch,
            2
        );
        let (code, msg) = refusal_message("web", "a", &lost(1, &rel), 2001);
        assert_eq!(code, "lease_lost");
        assert_eq!(msg, "a no longer holds vip web with epoch 1 (it expired or was released; now held by nobody): acquire it again without an epoch");
        let (code, msg) = refusal_message("web", "b", &Refusal::Held(r.lease.clone()), 2000);
        assert_eq!(code, "held");
        assert!(msg.starts_with("vip web is held by a (epoch 1)"), "{msg}");
    }
}
