//! `fabctl net|port|switch …`: overlay networks, their ports and the vswitches serving them.

use crate::{ago, print_json, table};
use clap::{Subcommand, ValueEnum};
use volume_mgr::api;
use volume_mgr::client::Client;

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// Create an overlay network: a tenant's private L2 segment, one VXLAN VNI.
    Create {
        name: String,
        /// VXLAN network identifier, 1-16777215, unique in the cluster.
        #[arg(long)]
        vni: u32,
        /// IPv4 subnet, CIDR with host bits zero: 10.0.0.0/24 (prefix /8 to /30). Its last
        /// usable address is the DHCP server's.
        #[arg(long)]
        subnet: String,
        /// Interface MTU of the ports, 576-9000 [default: each vswitch's underlay MTU - 50].
        #[arg(long)]
        mtu: Option<u32>,
        /// Router handed out by DHCP (inside the subnet; never allocated to a port).
        #[arg(long)]
        gateway: Option<String>,
        /// DNS server handed out by DHCP (repeatable, or comma-separated).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
    },
    /// List networks with their port counts.
    Ls,
    /// Show one network and its ports.
    Show { name: String },
    /// Delete a network (refused while it has ports).
    Rm { name: String },
    /// Change a network's MTU, router or DNS servers (the VNI and subnet cannot change).
    Set {
        name: String,
        /// Interface MTU of the ports, 576-9000; 0: each vswitch's underlay MTU - 50.
        #[arg(long)]
        mtu: Option<u32>,
        /// Router handed out by DHCP; "" clears it.
        #[arg(long)]
        gateway: Option<String>,
        /// DNS servers handed out by DHCP (replaces the list; comma-separated).
        #[arg(long, value_delimiter = ',')]
        dns: Option<Vec<String>>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    /// The vswitch creates a tap device (optionally moved into --netns).
    Tap,
    /// The vswitch attaches an existing interface (QEMU's tap) as soon as it appears.
    Netdev,
}

impl From<KindArg> for api::PortKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Tap => api::PortKind::Tap,
            KindArg::Netdev => api::PortKind::Netdev,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum PortCmd {
    /// Create a port: a VM's or namespace's NIC on a network, served by HOST's vswitch.
    Create {
        /// Port name (at most 15 characters; the interface's name unless --ifname).
        name: String,
        /// The network.
        #[arg(long)]
        net: String,
        /// The host (a registered vswitch or blockd node).
        #[arg(long)]
        node: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// MAC address xx:xx:xx:xx:xx:xx, unicast [default: allocated, 02:…].
        #[arg(long)]
        mac: Option<String>,
        /// IPv4 address in the subnet [default: the lowest free one].
        #[arg(long)]
        ip: Option<String>,
        /// tap only: move the interface into this network namespace (`ip netns` name).
        #[arg(long)]
        netns: Option<String>,
        /// Interface name (at most 15 characters) [default: the port's name].
        #[arg(long)]
        ifname: Option<String>,
        /// The VIP (on this network) whose address the port carries: lb-vip's port for it
        /// [default: none; a VIP's address is then refused].
        #[arg(long)]
        vip: Option<String>,
    },
    /// Move a port to another host's vswitch (MAC, IP and interface name stay).
    Move {
        name: String,
        /// The new host (a registered vswitch or blockd node).
        #[arg(long)]
        node: String,
    },
    /// List ports.
    Ls {
        /// Only the ports of this network.
        #[arg(long)]
        net: Option<String>,
        /// Only the ports on this host.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show one port with the counters its vswitch last reported.
    Show { name: String },
    /// Delete a port.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum SwitchCmd {
    /// List vswitches: underlay address, VXLAN port, underlay MTU, state.
    Ls,
}

fn kind(k: api::PortKind) -> &'static str {
    match k {
        api::PortKind::Tap => "tap",
        api::PortKind::Netdev => "netdev",
    }
}

fn state(s: api::NodeState) -> &'static str {
    match s {
        api::NodeState::Up => "up",
        api::NodeState::Down => "down",
    }
}

fn mtu(m: Option<u32>) -> String {
    m.map(|m| m.to_string()).unwrap_or_else(|| "auto".into())
}

/// NAME VNI SUBNET MTU PORTS.
fn network_rows(nets: &[api::Network], ports: &[api::Port]) -> Vec<Vec<String>> {
    nets.iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.vni.to_string(),
                n.subnet.clone(),
                mtu(n.mtu),
                ports
                    .iter()
                    .filter(|p| p.network == n.name)
                    .count()
                    .to_string(),
            ]
        })
        .collect()
}

/// NAME NET NODE KIND MAC IP IFNAME.
fn port_rows(ports: &[api::Port]) -> Vec<Vec<String>> {
    ports
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.network.clone(),
                p.node.clone(),
                kind(p.kind).into(),
                p.mac.clone(),
                p.ip.clone(),
                p.ifname.clone(),
            ]
        })
        .collect()
}

/// NODE UNDERLAY PORT MTU STATE.
fn switch_rows(switches: &[api::Switch]) -> Vec<Vec<String>> {
    switches
        .iter()
        .map(|s| {
            vec![
                s.node.clone(),
                s.underlay_ip.clone(),
                s.vxlan_port.to_string(),
                s.underlay_mtu.to_string(),
                state(s.state).into(),
            ]
        })
        .collect()
}

/// The `key value` lines of `port show`, counters last.
fn port_details(p: &api::Port) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("name", p.name.clone()),
        ("network", p.network.clone()),
        ("node", p.node.clone()),
        ("kind", kind(p.kind).into()),
        ("mac", p.mac.clone()),
        ("ip", p.ip.clone()),
        ("ifname", p.ifname.clone()),
        (
            "netns",
            p.netns.clone().unwrap_or_else(|| "- (host)".into()),
        ),
        ("created", ago(p.created_ms)),
    ];
    if let Some(v) = &p.vip {
        rows.push(("vip", v.clone()));
    }
    match &p.stats {
        None => rows.push(("counters", "no counters reported yet".into())),
        Some(s) => {
            rows.push(("attached", if s.attached { "yes" } else { "no" }.into()));
            rows.push((
                "rx",
                format!(
                    "{} packets, {} bytes (from the port)",
                    s.rx_packets, s.rx_bytes
                ),
            ));
            rows.push((
                "tx",
                format!(
                    "{} packets, {} bytes (to the port)",
                    s.tx_packets, s.tx_bytes
                ),
            ));
            let total: u64 = s.drops.values().fold(0, |a, b| a.saturating_add(*b));
            rows.push((
                "drops",
                if s.drops.is_empty() {
                    "0".into()
                } else {
                    format!(
                        "{total} ({})",
                        s.drops
                            .iter()
                            .map(|(k, v)| format!("{k} {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            ));
        }
    }
    rows
}

fn print_rows(rows: &[(&str, String)]) {
    for (k, v) in rows {
        println!("{k:<12} {v}");
    }
}

pub async fn net(client: &Client, cmd: NetCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        NetCmd::Create {
            name,
            vni,
            subnet,
            mtu: m,
            gateway,
            dns,
        } => {
            let n = client
                .create_network(&api::CreateNetwork {
                    name,
                    vni,
                    subnet,
                    mtu: m,
                    gateway,
                    dns,
                })
                .await?;
            if json {
                print_json(&n)?;
            } else {
                println!(
                    "created network {} (vni {}, subnet {}, mtu {})",
                    n.name,
                    n.vni,
                    n.subnet,
                    mtu(n.mtu)
                );
            }
        }
        NetCmd::Ls => {
            let nets = client.list_networks().await?.items;
            if json {
                print_json(&nets)?;
            } else {
                let ports = client.list_ports(None, None).await?.items;
                table::print(
                    &["NAME", "VNI", "SUBNET", "MTU", "PORTS"],
                    &network_rows(&nets, &ports),
                );
            }
        }
        NetCmd::Show { name } => {
            let n = client.get_network(&name).await?;
            let ports = client.list_ports(Some(&name), None).await?.items;
            if json {
                let mut j = serde_json::to_value(&n)?;
                j["ports"] = serde_json::to_value(&ports)?;
                print_json(&j)?;
            } else {
                let dhcp = volume_mgr::net::Subnet::parse(&n.subnet)
                    .map(|s| s.dhcp_server().to_string())
                    .unwrap_or_else(|_| "-".into());
                print_rows(&[
                    ("name", n.name.clone()),
                    ("vni", n.vni.to_string()),
                    ("subnet", n.subnet.clone()),
                    (
                        "mtu",
                        n.mtu
                            .map(|m| m.to_string())
                            .unwrap_or_else(|| "auto (underlay MTU - 50)".into()),
                    ),
                    (
                        "gateway",
                        n.gateway.clone().unwrap_or_else(|| "none".into()),
                    ),
                    (
                        "dns",
                        if n.dns.is_empty() {
                            "none".into()
                        } else {
                            n.dns.join(", ")
                        },
                    ),
                    ("dhcp server", dhcp),
                    ("ports", ports.len().to_string()),
                    ("created", ago(n.created_ms)),
                ]);
                if !ports.is_empty() {
                    println!();
                    table::print(
                        &["NAME", "NET", "NODE", "KIND", "MAC", "IP", "IFNAME"],
                        &port_rows(&ports),
                    );
                }
            }
        }
        NetCmd::Set {
            name,
            mtu,
            gateway,
            dns,
        } => {
            if mtu.is_none() && gateway.is_none() && dns.is_none() {
                anyhow::bail!("nothing to change: give --mtu, --gateway or --dns");
            }
            let n = client
                .update_network(
                    &name,
                    &volume_mgr::api::UpdateNetwork {
                        mtu,
                        gateway,
                        dns,
                        ..Default::default()
                    },
                )
                .await?;
            if json {
                print_json(&n)?;
            } else {
                println!(
                    "network {name}: mtu {}, gateway {}, dns {}",
                    n.mtu
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "underlay - 50".into()),
                    n.gateway.as_deref().unwrap_or("none"),
                    if n.dns.is_empty() {
                        "none".to_string()
                    } else {
                        n.dns.join(",")
                    }
                );
            }
        }
        NetCmd::Rm { name } => {
            client.delete_network(&name).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted network {name}");
            }
        }
    }
    Ok(())
}

pub async fn port(client: &Client, cmd: PortCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        PortCmd::Create {
            name,
            net,
            node,
            kind: k,
            mac,
            ip,
            netns,
            ifname,
            vip,
        } => {
            let p = client
                .create_port(&api::CreatePort {
                    name,
                    network: net,
                    node,
                    kind: k.into(),
                    mac,
                    ip,
                    netns,
                    ifname,
                    vip,
                })
                .await?;
            if json {
                print_json(&p)?;
            } else {
                println!(
                    "created port {} on network {} (node {}, {}, mac {}, ip {}, ifname {})",
                    p.name,
                    p.network,
                    p.node,
                    kind(p.kind),
                    p.mac,
                    p.ip,
                    p.ifname
                );
            }
        }
        PortCmd::Ls { net, node } => {
            let ports = client
                .list_ports(net.as_deref(), node.as_deref())
                .await?
                .items;
            if json {
                print_json(&ports)?;
            } else {
                table::print(
                    &["NAME", "NET", "NODE", "KIND", "MAC", "IP", "IFNAME"],
                    &port_rows(&ports),
                );
            }
        }
        PortCmd::Show { name } => {
            let p = client.get_port(&name).await?;
            if json {
                print_json(&p)?;
            } else {
                print_rows(&port_details(&p));
            }
        }
        PortCmd::Move { name, node } => {
            let p = client.move_port(&name, &node).await?;
            if json {
                print_json(&p)?;
            } else {
                println!("moved port {} to node {}", p.name, p.node);
            }
        }
        PortCmd::Rm { name } => {
            client.delete_port(&name).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted port {name}");
            }
        }
    }
    Ok(())
}

pub async fn switch(client: &Client, cmd: SwitchCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        SwitchCmd::Ls => {
            let l = client.list_switches().await?.items;
            if json {
                print_json(&l)?;
            } else {
                table::print(
                    &["NODE", "UNDERLAY", "PORT", "MTU", "STATE"],
                    &switch_rows(&l),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, network: &str, stats: Option<api::PortStats>) -> api::Port {
        api::Port {
            name: name.into(),
            network: network.into(),
            node: "h1".into(),
            kind: api::PortKind::Netdev,
            mac: "02:00:00:00:00:01".into(),
            ip: "10.0.0.2".into(),
            netns: None,
            ifname: "vnet0".into(),
            created_ms: 0,
            vip: None,
            stats,
        }
    }

    #[test]
    fn network_rows_count_ports() {
        let n = |name: &str, m| api::Network {
            name: name.into(),
            vni: 7,
            subnet: "10.0.0.0/24".into(),
            mtu: m,
            gateway: None,
            dns: vec![],
            created_ms: 0,
        };
        let rows = network_rows(
            &[n("a", None), n("b", Some(1400))],
            &[
                port("p1", "a", None),
                port("p2", "a", None),
                port("p3", "c", None),
            ],
        );
        assert_eq!(
            rows,
            vec![
                vec!["a", "7", "10.0.0.0/24", "auto", "2"],
                vec!["b", "7", "10.0.0.0/24", "1400", "0"],
            ]
        );
    }

    #[test]
    fn port_details_with_and_without_counters() {
        let rows = port_details(&port("p1", "a", None));
        assert_eq!(rows.last().unwrap().1, "no counters reported yet");
        assert_eq!(rows[3], ("kind", "netdev".to_string()));
        assert_eq!(rows[7], ("netns", "- (host)".to_string()));
        let mut s = api::PortStats {
            rx_packets: 1,
            rx_bytes: 60,
            tx_packets: 2,
            tx_bytes: 120,
            attached: false,
            ..Default::default()
        };
        let rows = port_details(&port("p1", "a", Some(s.clone())));
        let get = |rows: &[(&str, String)], k: &str| {
            rows.iter().find(|r| r.0 == k).map(|r| r.1.clone()).unwrap()
        };
        assert_eq!(get(&rows, "attached"), "no");
        assert_eq!(get(&rows, "rx"), "1 packets, 60 bytes (from the port)");
        assert_eq!(get(&rows, "tx"), "2 packets, 120 bytes (to the port)");
        assert_eq!(get(&rows, "drops"), "0");
        s.drops.insert("spoofed_ip".into(), 3);
        s.drops.insert("oversize".into(), 1);
        s.attached = true;
        let rows = port_details(&port("p1", "a", Some(s)));
        assert_eq!(get(&rows, "drops"), "4 (oversize 1, spoofed_ip 3)");
        assert_eq!(get(&rows, "attached"), "yes");
    }
}
