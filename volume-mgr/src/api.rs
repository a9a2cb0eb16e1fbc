//! The `/v1` API types: the JSON contract between volume-mgr, the agents (blockd) and fabctl.
//!
//! Every request body rejects unknown fields. Sizes are bytes (`u64`); the CLI parses
//! human units. Times are milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};

/// Default chunk size of a volume (4 MiB), see DESIGN.md "Data path rules".
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// Error body of every non-2xx answer: a stable machine code and a one-line reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// Stable code, e.g. `not_found`, `already_exists`, `invalid_argument`, `no_capacity`.
    pub code: String,
    /// One line, for humans.
    pub message: String,
}

/// A list with the store revision it was read at (for long-poll watches).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct List<T> {
    pub revision: u64,
    pub items: Vec<T>,
}

/// A disk as an agent reports it when it registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Path on the node (file or block device).
    pub path: String,
    /// Usable capacity in bytes (chunk slots only).
    pub capacity: u64,
    /// Bytes in use by chunks.
    pub used: u64,
}

/// `PUT /v1/nodes/{name}`: an agent registers (or re-registers) itself and its disks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    /// Replica protocol address, `IP:PORT`.
    pub address: String,
    /// NBD TCP address, `IP:PORT`.
    pub nbd_address: String,
    /// NBD unix socket path, if any.
    #[serde(default)]
    pub nbd_socket: Option<String>,
    /// Failure-domain label (rack); defaults to the node name.
    #[serde(default)]
    pub zone: Option<String>,
    pub disks: Vec<DiskSpec>,
}

/// `PUT /v1/nodes/{name}/heartbeat`: liveness plus current disk usage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub disks: Vec<DiskSpec>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Up,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub address: String,
    pub nbd_address: String,
    #[serde(default)]
    pub nbd_socket: Option<String>,
    pub zone: String,
    pub state: NodeState,
    /// Last heartbeat (or registration), ms since the epoch.
    pub last_heartbeat_ms: u64,
    pub registered_ms: u64,
}

/// `POST /v1/nodes/{name}/drain`: the node is draining; `volumes` still have replicas on it
/// (`NAME (N sets)`), empty once it holds nothing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeDrain {
    pub node: String,
    pub draining: bool,
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub node: String,
    pub path: String,
    pub capacity: u64,
    pub used: u64,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Bytes; must be a positive multiple of 4096.
    pub size: u64,
    /// Replicas of every chunk (default: the manager's `--default-replicas`).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Fewest replicas a write may be acknowledged on (default: min(2, replicas)).
    #[serde(default)]
    pub min_replicas: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    /// Cluster-unique, never reused; chunk stores key chunks by it.
    pub id: u64,
    pub size: u64,
    pub chunk_size: u64,
    pub replicas: u32,
    #[serde(default)]
    pub min_replicas: u32,
    /// Placement: chunk `i` belongs to set `i % sets.len()`.
    #[serde(default)]
    pub sets: Vec<ChunkSet>,
    pub created_ms: u64,
}

/// The replicas of one chunk set, in placement order (best first).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkSet {
    pub members: Vec<Member>,
}

/// One replica of a chunk set. In service = holds every acknowledged write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub node: String,
    pub in_service: bool,
}

/// `POST /v1/volumes/{name}/replicas`: the lease holder changes which replicas are in
/// service (out: it failed; in: it was resynchronised).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaUpdate {
    /// The caller's lease epoch; must be the current one.
    pub epoch: u64,
    pub node: String,
    pub in_service: bool,
    /// Set indices; None = every set that has `node` (listed sets without it are left
    /// alone). Recording out never takes a set's last in-service replica: that set keeps it.
    #[serde(default)]
    pub sets: Option<Vec<u32>>,
}

/// Bytes for humans: `1 GiB`, `1.5 TiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Volume names: 1..=64 chars of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "volume name must be 1 to 64 characters, got {}",
            name.len()
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("volume name must not start with '.' or '-'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "volume name contains {c:?}; allowed: A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        assert!(validate_volume_name("vm1-disk.0_a").is_ok());
        assert!(validate_volume_name("").is_err());
        assert!(validate_volume_name("-x").is_err());
        assert!(validate_volume_name("a/b").is_err());
        assert!(validate_volume_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn unknown_fields_rejected() {
        let r: Result<CreateVolume, _> =
            serde_json::from_str(r#"{"name":"a","size":4096,"bogus":1}"#);
        assert!(r.is_err());
    }
}

/// `GET /v1/cluster`: identity of the cluster (agents record it on their disks and refuse a
/// manager with another one, so a wiped manager can never be mistaken for the old cluster).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub revision: u64,
    /// The state store: `embedded` or `etcd`.
    #[serde(default)]
    pub store: String,
    /// The manager that answered (its advertised URL).
    #[serde(default)]
    pub manager: String,
    /// The manager that runs the controllers now, as the answering one last saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// `POST /v1/volumes/{name}/lease`: a gateway asks to become the volume's single writer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub node: String,
}

/// The single-writer lease of a volume. Every change of holder bumps `epoch`; replicas refuse
/// I/O carrying an older epoch, so a gateway that lost the lease can never write again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub volume: String,
    pub holder: String,
    pub epoch: u64,
    pub acquired_ms: u64,
}

// ---- Overlay networks (vswitch) ------------------------------------------------------------

/// Smallest and largest VXLAN network identifier a network may use (24 bits; 0 is reserved).
pub const VNI_MIN: u32 = 1;
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// `POST /v1/networks`: a tenant's private L2 network, one VXLAN VNI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// Same rules as volume names.
    pub name: String,
    /// VXLAN network identifier, `VNI_MIN..=VNI_MAX`, unique in the cluster.
    pub vni: u32,
    /// IPv4 subnet in CIDR form, `192.0.2.0/24` (prefix 8..=30, host bits zero).
    pub subnet: String,
    /// Interface MTU of the ports (576..=9000); None: each vswitch uses its underlay MTU − 50.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Router address handed out by DHCP (option 3); must lie inside the subnet. None: no router.
    #[serde(default)]
    pub gateway: Option<String>,
    /// DNS servers handed out by DHCP (option 6).
    #[serde(default)]
    pub dns: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub name: String,
    pub vni: u32,
    /// Canonical CIDR, `192.0.2.0/24`.
    pub subnet: String,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PortKind {
    /// vswitch creates a tap device and keeps its fd (optionally moved into a netns).
    Tap,
    /// vswitch attaches an interface someone else created (QEMU's tap) via AF_PACKET.
    Netdev,
}

/// `POST /v1/ports`: a VM's (or namespace's) NIC on a network, served by the vswitch of `node`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePort {
    /// Same rules as volume names, at most 15 characters (it names the interface by default).
    pub name: String,
    pub network: String,
    /// A registered vswitch (or blockd) node.
    pub node: String,
    pub kind: PortKind,
    /// `02:00:00:00:00:01` form, unicast; None: allocated (locally administered, unique in
    /// the network).
    #[serde(default)]
    pub mac: Option<String>,
    /// Inside the subnet, not its network/broadcast address nor the DHCP server's (the last
    /// usable one), unique in the network; the gateway only when given explicitly (a router
    /// VM). None: the lowest free address that is none of those is allocated.
    #[serde(default)]
    pub ip: Option<String>,
    /// `tap` only: move the interface into this network namespace (`ip netns` name).
    #[serde(default)]
    pub netns: Option<String>,
    /// Interface name (≤ 15 chars); default: the port's name.
    #[serde(default)]
    pub ifname: Option<String>,
    /// The VIP whose address this port carries (lb-vip's port for a VIP on an overlay
    /// network): the VIP must exist on `network`, and the port's IP is the VIP's (taken from it
    /// when `ip` is None). Only such a port may have a VIP's address; a VIP has at most one;
    /// deleting the VIP deletes it.
    #[serde(default)]
    pub vip: Option<String>,
}

/// `PUT /v1/ports/{name}/node`: the port moves to another node's vswitch (the old one
/// removes its interface, the new one creates it); MAC, IP and ifname stay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MovePort {
    /// A registered vswitch (or blockd) node.
    pub node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub name: String,
    pub network: String,
    pub node: String,
    pub kind: PortKind,
    pub mac: String,
    pub ip: String,
    #[serde(default)]
    pub netns: Option<String>,
    pub ifname: String,
    pub created_ms: u64,
    /// The VIP this port carries the address of (see `CreatePort::vip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// Last counters reported by the port's vswitch (not stored; absent until reported).
    #[serde(default)]
    pub stats: Option<PortStats>,
}

/// Counters of one port as its vswitch counts them. rx = frames the port's interface sent into
/// the switch (from the VM); tx = frames the switch delivered to it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped frames by reason (`spoofed_mac`, `spoofed_ip`, `oversize`, `malformed`,
    /// `unknown_vni`, `no_destination`, `queue_full`).
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Whether the vswitch has the port's interface attached right now.
    #[serde(default)]
    pub attached: bool,
}

/// `PUT /v1/switches/{node}`: a vswitch registers its VTEP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterSwitch {
    /// Underlay IPv4 address VXLAN packets are sent to.
    pub underlay_ip: String,
    /// UDP port of its VXLAN socket (4789).
    pub vxlan_port: u16,
    /// MTU of its underlay interface.
    pub underlay_mtu: u32,
}

/// `PUT /v1/switches/{node}/heartbeat`: liveness plus port counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchHeartbeat {
    #[serde(default)]
    pub ports: std::collections::BTreeMap<String, PortStats>,
}

/// A registered vswitch. `state` is as recorded by the manager: down once it has not
/// heartbeaten for the manager's `--down-after`, up again at its next heartbeat (each change is
/// a store commit that wakes netstate watches). `last_heartbeat_ms`: the live value in
/// `GET /v1/switches`; in `NetState`, the one at the last recorded change (so a netstate is a
/// pure function of its revision).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub node: String,
    pub underlay_ip: String,
    pub vxlan_port: u16,
    pub underlay_mtu: u32,
    pub state: NodeState,
    pub last_heartbeat_ms: u64,
    pub registered_ms: u64,
}

/// `GET /v1/netstate[?after_revision=N&timeout_ms=T]`: everything a vswitch programs, at one
/// store revision (ports without `stats`). With `after_revision`, the call waits (long-poll,
/// `timeout_ms` default 30 s, at most 60 s) until networks, ports or switches (a switch
/// recorded up or down included) change past N, then answers (or answers unchanged at the
/// timeout, or at once when the manager shuts down). Heartbeats that change nothing do not
/// wake it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    pub revision: u64,
    pub networks: Vec<Network>,
    pub ports: Vec<Port>,
    pub switches: Vec<Switch>,
}

// ---- Load-balanced virtual IPs (lb-vip) ----------------------------------------------------

/// Largest backend weight (`1..=VIP_WEIGHT_MAX`).
pub const VIP_WEIGHT_MAX: u32 = 256;
/// Default Maglev lookup table size (prime, as in the Maglev paper).
pub const VIP_DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;
/// Smallest Maglev lookup table size accepted (must also be prime).
pub const VIP_MIN_MAGLEV_TABLE_SIZE: u32 = 7;
/// Default time a drained or removed backend keeps its established connections.
pub const VIP_DEFAULT_DRAIN_SECS: u32 = 30;
/// Largest `persist_secs` / `drain_secs` (one day).
pub const VIP_MAX_SECS: u32 = 86_400;

/// Transport protocol a VIP serves.
#[derive(
    Debug,
    Clone,
    Copy,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VipProto {
    Tcp,
    Udp,
}

impl VipProto {
    /// Wire (and CLI) spelling: `tcp`, `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            VipProto::Tcp => "tcp",
            VipProto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for VipProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VipProto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(VipProto::Tcp),
            "udp" => Ok(VipProto::Udp),
            other => Err(format!("unknown protocol {other:?} (tcp or udp)")),
        }
    }
}

/// Scheduling algorithm of a VIP (lb-vip's `sched::Algo`, defined here so volume-mgr does not
/// depend on lb-vip). Wire spelling snake_case (`source_hash`); the CLI spells it
/// `source-hash`. Default `rr`.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VipAlgo {
    /// Round robin.
    #[default]
    Rr,
    /// Smooth weighted round robin (nginx).
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Power of two random choices (fewer active connections wins).
    P2c,
    /// Hash of the client IP.
    SourceHash,
    /// Maglev consistent hashing of the flow.
    Maglev,
}

impl VipAlgo {
    pub const ALL: [VipAlgo; 7] = [
        VipAlgo::Rr,
        VipAlgo::Wrr,
        VipAlgo::Lc,
        VipAlgo::Wlc,
        VipAlgo::P2c,
        VipAlgo::SourceHash,
        VipAlgo::Maglev,
    ];

    /// Wire spelling (`source_hash`).
    pub fn as_str(self) -> &'static str {
        match self {
            VipAlgo::Rr => "rr",
            VipAlgo::Wrr => "wrr",
            VipAlgo::Lc => "lc",
            VipAlgo::Wlc => "wlc",
            VipAlgo::P2c => "p2c",
            VipAlgo::SourceHash => "source_hash",
            VipAlgo::Maglev => "maglev",
        }
    }

    /// CLI spelling (`source-hash`).
    pub fn cli_name(self) -> &'static str {
        match self {
            VipAlgo::SourceHash => "source-hash",
            other => other.as_str(),
        }
    }
}

impl std::fmt::Display for VipAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl std::str::FromStr for VipAlgo {
    type Err = String;
    /// Accepts both the CLI (`source-hash`) and the wire (`source_hash`) spelling.
    fn from_str(s: &str) -> Result<Self, String> {
        VipAlgo::ALL
            .into_iter()
            .find(|a| a.as_str() == s || a.cli_name() == s)
            .ok_or_else(|| {
                format!("unknown algorithm {s:?} (rr, wrr, lc, wlc, p2c, source-hash, maglev)")
            })
    }
}

/// Kind of active health check.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// A TCP connect that completes within the timeout passes.
    #[default]
    Tcp,
    /// `GET http_path` answered with `http_status` within the timeout passes.
    Http,
}

fn default_check_interval_ms() -> u32 {
    2000
}
fn default_check_timeout_ms() -> u32 {
    1000
}
fn default_check_rise() -> u32 {
    2
}
fn default_check_fall() -> u32 {
    3
}

/// Active health check of a VIP's backends (defaults as HAProxy's). A backend goes down after
/// `fall` consecutive failures and up again after `rise` consecutive successes. In a
/// `CreateVip` every field but `kind` may be left out; in a `Vip` all are filled (`http_status`
/// is `Some(200)` by default for `http`, and both http fields are None for `tcp`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// `http` only: absolute path, starts with `/`, printable ASCII without spaces.
    #[serde(default)]
    pub http_path: Option<String>,
    /// `http` only: the status a healthy backend answers (100..=599), default 200.
    #[serde(default)]
    pub http_status: Option<u16>,
    /// Time between checks of one backend, 100..=3_600_000 ms, default 2000.
    #[serde(default = "default_check_interval_ms")]
    pub interval_ms: u32,
    /// Time one check may take, 10..=interval_ms, default 1000.
    #[serde(default = "default_check_timeout_ms")]
    pub timeout_ms: u32,
    /// Consecutive successes to come up, 1..=100, default 2.
    #[serde(default = "default_check_rise")]
    pub rise: u32,
    /// Consecutive failures to go down, 1..=100, default 3.
    #[serde(default = "default_check_fall")]
    pub fall: u32,
}

impl Default for HealthCheck {
    /// A TCP check every 2 s, timeout 1 s, rise 2, fall 3.
    fn default() -> Self {
        HealthCheck {
            kind: CheckKind::Tcp,
            http_path: None,
            http_status: None,
            interval_ms: default_check_interval_ms(),
            timeout_ms: default_check_timeout_ms(),
            rise: default_check_rise(),
            fall: default_check_fall(),
        }
    }
}

/// `POST /v1/vips`: one address (IP:PORT + protocol) spread over backends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVip {
    /// Same rules as volume names.
    pub name: String,
    /// `IP:PORT` (IPv4 `192.0.2.10:80` or IPv6 `[2001:db8::1]:80`), port not 0; unique
    /// together with `proto` (409 naming the VIP that holds it).
    pub addr: String,
    pub proto: VipProto,
    /// An existing overlay network the VIP is reachable on (its IP then lies in the
    /// network's subnet). None: reachable on the hosts' own networks.
    #[serde(default)]
    pub network: Option<String>,
    /// Default `rr`.
    #[serde(default)]
    pub algo: Option<VipAlgo>,
    /// Client-IP persistence in seconds, 0..=86400; 0 or None = off.
    #[serde(default)]
    pub persist_secs: Option<u32>,
    /// Time a drained or removed backend keeps its established connections, 0..=86400,
    /// default 30.
    #[serde(default)]
    pub drain_secs: Option<u32>,
    /// Default: `HealthCheck::default()` (TCP connect).
    #[serde(default)]
    pub check: Option<HealthCheck>,
    /// Send a PROXY protocol v2 header to the backends (TCP: at connection start; UDP: in
    /// front of each datagram). Default false.
    #[serde(default)]
    pub proxy_protocol: Option<bool>,
    /// Maglev lookup table size, prime, >= 7, default 65537 (kept for every algo).
    #[serde(default)]
    pub maglev_table_size: Option<u32>,
}

/// State of a backend as the control plane records it (health is the instances' business).
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Gets new connections (while healthy).
    #[default]
    Active,
    /// Gets no new connections; established ones finish until `drain_secs` after
    /// `drain_started_ms`.
    Draining,
}

/// A backend of a VIP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Canonical `IP:PORT` (`[v6]:port` for IPv6), unique in the VIP.
    pub addr: String,
    /// `1..=VIP_WEIGHT_MAX`, default 1.
    pub weight: u32,
    /// At most this many established connections (TCP) or flows (UDP); None: no limit.
    #[serde(default)]
    pub max_conns: Option<u32>,
    pub state: BackendState,
    /// When the backend was set to draining (ms since the epoch).
    #[serde(default)]
    pub drain_started_ms: Option<u64>,
}

/// `POST /v1/vips/{name}/backends`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddBackend {
    /// `IP:PORT`, port not 0.
    pub addr: String,
    /// `1..=VIP_WEIGHT_MAX`, default 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// At least 1; None: no limit.
    #[serde(default)]
    pub max_conns: Option<u32>,
}

/// A VIP as stored, with every default filled in, plus the instances' last reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub name: String,
    /// Canonical `IP:PORT`.
    pub addr: String,
    pub proto: VipProto,
    #[serde(default)]
    pub network: Option<String>,
    pub algo: VipAlgo,
    /// 0 = off.
    pub persist_secs: u32,
    pub drain_secs: u32,
    pub check: HealthCheck,
    pub proxy_protocol: bool,
    pub maglev_table_size: u32,
    /// In the order they were added.
    #[serde(default)]
    pub backends: Vec<Backend>,
    pub created_ms: u64,
    /// Last report of each lb-vip instance (by node), kept in memory by the manager like
    /// switch heartbeats (not stored, do not bump the revision nor wake `GET /v1/vips`
    /// watches; empty after a restart until the instances report again; reports older than
    /// the manager's `--down-after` are left out). Ignored in requests.
    #[serde(default)]
    pub reports: std::collections::BTreeMap<String, VipReport>,
    /// The holder lease (`POST /v1/vips/{name}/lease`), stored apart from the VIP and added to
    /// answers; absent when no instance ever held it. An expired lease (`expires_ms` past by
    /// the manager's clock) or a released one is shown until someone takes it: it has no
    /// holder any more. Ignored in requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<VipLease>,
}

/// Counters and health of one backend as one lb-vip instance sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendStats {
    /// The backend's `addr` as in `Backend`.
    pub addr: String,
    pub healthy: bool,
    pub active_conns: u64,
    pub total_conns: u64,
    /// Bytes from clients to the backend.
    pub bytes_in: u64,
    /// Bytes from the backend to clients.
    pub bytes_out: u64,
    /// Up/down changes since the instance started.
    pub health_transitions: u64,
    /// Failed connects to the backend and connections ended by an error.
    pub errors: u64,
}

/// `PUT /v1/vips/{name}/status/{node}`: what the lb-vip instance on `node` sees of the VIP
/// (404 once the VIP is deleted). Kept in memory; a report older than the manager's
/// `--down-after` (5 s by default) is left out of `Vip::reports`, so an instance reports about
/// every second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VipReport {
    /// Whether this instance holds the VIP's address now.
    pub holder: bool,
    #[serde(default)]
    pub backends: Vec<BackendStats>,
}

/// Shortest VIP holder lease (ms).
pub const VIP_LEASE_TTL_MIN_MS: u64 = 500;
/// Longest VIP holder lease (ms).
pub const VIP_LEASE_TTL_MAX_MS: u64 = 60_000;

/// `POST /v1/vips/{name}/lease`: the lb-vip instance on `node` asks to hold the VIP's address
/// for `ttl_ms` (500..=60000) from when the manager handles the request. Granted (200
/// `VipLease`) when nobody holds it, the holder's lease expired, or `node` is the holder
/// (a renewal: same epoch, new expiry); otherwise 409 `held` naming the holder and when its
/// lease expires (or 409 `lease_lost` for a renewal naming an epoch `node` no longer holds).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VipLeaseRequest {
    pub node: String,
    pub ttl_ms: u64,
    /// A renewal: the epoch the caller holds. Granted only while `node` holds exactly that
    /// epoch, else 409 `lease_lost` (so a renewal delayed in the network past an expiry or a
    /// release starts no tenure the caller does not know of). None: acquire or renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Who may serve a VIP's address. `epoch` grows by one with every new tenure (another node,
/// or the same node again after its lease expired or was released) and stays on renewals.
/// Expiry is judged by the manager's clock; a holder stops serving earlier by its own clock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VipLease {
    pub vip: String,
    /// The node that holds (or last held) the lease.
    pub holder: String,
    pub epoch: u64,
    /// When the lease ends, ms since the epoch by the manager's clock (a release sets it to
    /// the release time).
    pub expires_ms: u64,
}

impl VipLease {
    /// Whether `holder` still holds it at `now_ms` (the manager's clock).
    pub fn is_held(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }
}

/// `PUT /v1/recovery/progress/{node}`: a blockd reports how many bytes its copies
/// (re-replication and resync) have moved since it started (a counter; a smaller value
/// than last time means the daemon restarted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryProgress {
    pub copied_bytes: u64,
    /// The same counter per volume (by name).
    #[serde(default)]
    pub volumes: std::collections::BTreeMap<String, u64>,
}

/// `GET /v1/recovery`: redundancy and re-replication state of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recovery {
    pub nodes_up: u32,
    pub nodes_down: u32,
    /// Down nodes silent for longer than `out_after` (their sets are being re-homed).
    pub nodes_out: Vec<String>,
    /// Chunk sets with fewer in-service replicas on up nodes than the volume wants.
    pub degraded_sets: u64,
    /// Replicas recorded but not in service yet on a node that is up (being copied to).
    pub syncing_replicas: u64,
    /// Upper bound of the bytes still to copy: the full share of every syncing replica's
    /// set (a delta resync moves less).
    pub bytes_left: u64,
    /// Bytes the blockds reported copied since this manager started.
    pub bytes_copied: u64,
    /// Copy rate over the last 10 s, bytes per second.
    pub rate: f64,
    /// `bytes_left / rate`, when something is moving.
    #[serde(default)]
    pub eta_s: Option<f64>,
    /// Replicas re-homed to a new node by this manager since it started.
    pub replaced: u64,
    pub volumes: Vec<VolumeRecovery>,
    /// Moves of chunk sets towards their ideal placement (after a node or disk is added).
    #[serde(default)]
    pub rebalance: Rebalance,
    /// Every registered node's share of the data and its condition (`fabctl node ls`).
    #[serde(default)]
    pub nodes: Vec<NodeHealth>,
    /// The manager's `full_ratio`: a disk this full takes no new chunks.
    #[serde(default)]
    pub full_ratio: f64,
}

/// The rebalancer's state in `GET /v1/recovery`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rebalance {
    /// False when the manager runs with `--no-rebalance`.
    pub enabled: bool,
    /// `idle` (every set where placement wants it), `moving`, `waiting` (sets to move, but
    /// not now: see `reason`) or `disabled`.
    pub state: String,
    /// Why nothing moves although sets are misplaced (degraded sets first, a node not up
    /// for `rebalance_after` yet, a drain under way, …); empty otherwise.
    #[serde(default)]
    pub reason: String,
    /// Chunk sets whose placement differs from the ideal one, no move started yet.
    pub pending: u64,
    /// Chunk sets with a move under way (the new member syncing, or the old one to leave).
    pub in_progress: u64,
    /// Moves completed (old member removed) by this manager since it started.
    pub moved: u64,
}

/// One node as `fabctl node ls` shows it (part of `GET /v1/recovery`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeHealth {
    pub name: String,
    /// Silent past `out_after`: its replicas are re-homed.
    pub out: bool,
    pub draining: bool,
    /// Every disk of the node is past `full_ratio` (or it has no capacity): it takes no
    /// new chunks.
    pub full: bool,
    /// Chunk sets that list the node (any state).
    pub sets: u64,
    /// Of those, the ones where its copy is not in service yet (being copied to).
    pub syncing: u64,
    /// Chunks of those sets (each set holds every n-th chunk of its volume).
    pub chunks: u64,
    /// Bytes used and capacity of its disks, as its last heartbeat reported them.
    pub used: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecovery {
    pub name: String,
    pub sets: u64,
    pub degraded_sets: u64,
    /// Sets with a replica being copied to.
    pub in_progress: u64,
    pub bytes_left: u64,
    /// Bytes copied for this volume since the manager started.
    pub bytes_copied: u64,
    /// Its copy rate over the last 10 s, bytes per second.
    pub rate: f64,
}

// ---- Backup and restore ----------------------------------------------------------------------

/// Format tag of a cluster backup.
pub const BACKUP_FORMAT: &str = "fabric-backup/1";

/// The whole cluster state at one store revision (`GET /v1/backup`, `fabctl backup FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// [`BACKUP_FORMAT`].
    pub format: String,
    pub cluster_id: String,
    /// The store revision every object was read at.
    pub revision: u64,
    pub created_ms: u64,
    pub objects: Vec<BackupObject>,
}

/// One stored object: its kind (`node`, `volume`, `lease`, …), name and value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupObject {
    pub kind: String,
    pub name: String,
    /// The stored JSON value (absent when the value is not JSON; then `raw` holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// A stored value that is not JSON, as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// What `POST /v1/restore` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreReport {
    /// Objects written.
    pub restored: u64,
    /// Objects of the cluster that were not in the backup and were deleted (`force` only).
    pub deleted: u64,
    /// Volume and VIP leases whose epoch was moved past anything issued before the restore.
    pub leases_bumped: u64,
    pub cluster_id: String,
    pub revision: u64,
}

// ---- Watch ------------------------------------------------------------------------------------

/// One change in `GET /v1/watch`: object `name` of `kind` was written (`object` holds its new
/// record) or deleted, in the commit that produced revision `rev`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchEvent {
    pub rev: u64,
    /// `node`, `disk`, `volume`, `lease`, `network`, `port`, `switch`, `vip` or `viplease`.
    pub kind: String,
    pub name: String,
    pub deleted: bool,
    /// The record as `GET` of that kind's list returns it (absent when deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
}

/// Changes after `since` (`GET /v1/watch`), in commit order. `revision`: where the next watch
/// resumes (`since=revision`); it can be past the last event's when changes of other kinds
/// were skipped. No events: nothing of the asked kinds changed before the timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchEvents {
    pub revision: u64,
    pub events: Vec<WatchEvent>,
}

// ---- Updates ----------------------------------------------------------------------------------

/// `PATCH /v1/volumes/{name}`: the fields that can change; absent ones stay. `size` and
/// `replicas` are accepted only to be refused with a reason (400).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVolume {
    /// Fewest in-service replicas a write needs, 1..=replicas. Gateways use it from their
    /// next attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

/// `PATCH /v1/networks/{name}`: the fields that can change; absent ones stay. `vni` and
/// `subnet` are accepted only to be refused with a reason (400).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNetwork {
    /// Interface MTU of the ports, 576..=9000; 0 clears it (each vswitch's underlay MTU − 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Router handed out by DHCP; "" clears it. Refused while a port has that address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// DNS servers handed out by DHCP (replaces the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}
