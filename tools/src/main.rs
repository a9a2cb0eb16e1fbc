//! fabctl: the one CLI for Fabric operators.

mod backup;
mod net;
mod node;
mod progress;
mod size;
mod status;
mod table;
mod transfer;
mod up;
mod verify;
mod vip;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use volume_mgr::api;
use volume_mgr::client::Client;

#[derive(Parser, Debug)]
#[command(
    name = "fabctl",
    version,
    about = "Operate a Fabric cluster: volumes, nodes, disks, overlay networks, ports, vswitches, load-balanced VIPs; `fabctl up` for one host"
)]
struct Cli {
    /// volume-mgr URL(s), comma-separated (tried in order): http://HOST:PORT or https://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "FABRIC_MANAGER",
        default_value = "http://127.0.0.1:7700"
    )]
    manager: String,
    /// Bearer token for a manager with tokens configured (read-only tokens: listing only).
    #[arg(long, global = true, env = "FABRIC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate to trust for an https:// manager (e.g. its self-signed certificate).
    #[arg(long = "manager-ca", global = true, env = "FABRIC_CA")]
    manager_ca: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Volumes (replicated block devices served over NBD).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Nodes (hosts running blockd).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Disks pooled by the nodes.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Overlay networks (one VXLAN VNI each).
    #[command(subcommand)]
    Net(net::NetCmd),
    /// Ports: a VM's or namespace's NIC on a network, served by its host's vswitch.
    #[command(subcommand)]
    Port(net::PortCmd),
    /// vswitches (one per host).
    #[command(subcommand)]
    Switch(net::SwitchCmd),
    /// Load-balanced virtual IPs (served by lb-vip) and their backends.
    #[command(subcommand)]
    Vip(vip::VipCmd),
    /// Cluster health: nodes, degraded sets, recovery progress (--watch follows it).
    Status(status::StatusArgs),
    /// Run the single-host all-in-one (volume-mgr, blockd, vswitch, lb-vip) until Ctrl-C.
    Up(up::UpArgs),
    /// Save the whole cluster state (one store revision) to FILE ("-": standard output).
    Backup { file: String },
    /// Load a backup into the cluster. Refused when the cluster already has volumes,
    /// networks, ports or VIPs unless --force (which replaces everything). Lease epochs move up
    /// so no writer fenced since the backup can write again.
    Restore {
        file: String,
        /// Replace the cluster's current state (objects not in the backup are deleted).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size: bytes, or a number with a binary unit (K = 1024): 512M, 10G, 1.5T, 10GiB.
        /// Must be a multiple of 4 KiB.
        #[arg(long)]
        size: String,
        /// Replicas of every chunk, on distinct failure domains [default: the manager's
        /// --default-replicas, 3].
        #[arg(long)]
        replicas: Option<u32>,
        /// Fewest replicas a write may be acknowledged on [default: min(2, replicas)].
        #[arg(long)]
        min_replicas: Option<u32>,
    },
    /// List volumes.
    Ls,
    /// Show one volume: placement, each replica's node and state, the lease.
    Show { name: String },
    /// Change a volume's settings (size and replicas cannot change).
    Set {
        name: String,
        /// Fewest in-service replicas a write needs, 1..=replicas (used from the next attach).
        #[arg(long)]
        min_replicas: u32,
    },
    /// Compare every replica's chunk versions and checksums; exit 1 on any difference.
    Verify {
        name: String,
        /// The cluster secret file (the one blockd uses) to talk to the replicas.
        #[arg(long, env = "FABRIC_SECRET_FILE", default_value = verify::DEFAULT_SECRET_FILE)]
        secret_file: std::path::PathBuf,
        /// Repair first: every in-service copy of each chunk gets the copy with the highest
        /// chunk version whose checksums are all good (then verify runs; exit 0 only if equal).
        #[arg(long)]
        repair: bool,
    },
    /// Delete a volume and its data.
    Rm { name: String },
    /// Copy an image file (raw or qcow2) into a volume (qemu-img convert over NBD).
    Import {
        name: String,
        file: std::path::PathBuf,
        /// The file's format.
        #[arg(long, value_enum, default_value = "auto")]
        format: transfer::ImageFormat,
        /// Create the volume with the image's virtual size if it does not exist.
        #[arg(long)]
        create: bool,
        /// With --create: replicas of the new volume [default: the manager's].
        #[arg(long)]
        replicas: Option<u32>,
        /// The volume's NBD URL [default: from the node records].
        #[arg(long)]
        nbd: Option<String>,
    },
    /// Copy a volume into an image file (qemu-img convert over NBD).
    Export {
        name: String,
        file: std::path::PathBuf,
        /// The file's format.
        #[arg(long, value_enum, default_value = "raw")]
        format: transfer::ImageFormat,
        /// The volume's NBD URL [default: from the node records].
        #[arg(long)]
        nbd: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes: state (up/down/out), draining/full, sets and chunks held, disk use.
    Ls,
    /// Move every replica off a node (marks it draining; waits until it holds nothing).
    Drain {
        name: String,
        /// Return once marked, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the node to empty (exit 1 after it).
        #[arg(long, default_value = "1h", value_parser = volume_mgr::humantime_serde::parse)]
        timeout: std::time::Duration,
    },
    /// Remove a node's record (refused while it still holds replicas: drain it first).
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// List disks with capacity and use.
    Ls,
}

pub use size::parse_size;

/// The `--manager` value: one or more `http://HOST:PORT` (or `https://`) URLs, comma-separated.
fn manager_urls(arg: &str) -> anyhow::Result<Vec<String>> {
    let urls: Vec<String> = arg
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if urls.is_empty() {
        anyhow::bail!("--manager is empty: give http://HOST:PORT");
    }
    for u in &urls {
        let host = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"))
            .ok_or_else(|| {
                anyhow::anyhow!("--manager {u:?}: expected http://HOST:PORT or https://HOST:PORT")
            })?;
        if host.is_empty() || host.contains('/') {
            anyhow::bail!("--manager {u:?}: expected http://HOST:PORT, without a path");
        }
    }
    Ok(urls)
}

pub fn human(bytes: u64) -> String {
    api::human_bytes(bytes)
}

fn ago(ms: u64) -> String {
    let now = volume_mgr::server::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn volume_rows(vs: &[api::Volume]) -> Vec<Vec<String>> {
    vs.iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.to_string(),
                human(v.size),
                v.replicas.to_string(),
                human(v.chunk_size),
            ]
        })
        .collect()
}

/// Set indices for humans: `0-4,7,9-31`.
fn set_ranges(sets: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sets.len() {
        let mut j = i;
        while j + 1 < sets.len() && sets[j + 1] == sets[j] + 1 {
            j += 1;
        }
        out.push(match j - i {
            0 => sets[i].to_string(),
            1 => format!("{},{}", sets[i], sets[j]),
            _ => format!("{}-{}", sets[i], sets[j]),
        });
        i = j + 1;
    }
    out.join(",")
}

/// The replica table of `volume show`: one row per (node, replica state) with the chunk sets
/// it covers, so a 32-set volume on three nodes stays three lines while healthy. Columns:
/// SETS, NODE, ZONE, STATE (in-service / out-of-service), NODE-STATE (up / down).
fn replica_rows(v: &api::Volume, nodes: &[api::Node]) -> Vec<Vec<String>> {
    // In-service rows first for each node.
    let mut by: std::collections::BTreeMap<(String, bool), Vec<usize>> = Default::default();
    for (i, s) in v.sets.iter().enumerate() {
        for m in &s.members {
            by.entry((m.node.clone(), !m.in_service))
                .or_default()
                .push(i);
        }
    }
    by.into_iter()
        .map(|((node, out), sets)| {
            let n = nodes.iter().find(|n| n.name == node);
            let sets_s = if sets.len() == v.sets.len() && sets.len() > 1 {
                format!("all {}", sets.len())
            } else {
                set_ranges(&sets)
            };
            vec![
                sets_s,
                node.clone(),
                n.map(|n| n.zone.clone()).unwrap_or_else(|| "-".into()),
                if out {
                    "out-of-service".into()
                } else {
                    "in-service".into()
                },
                n.map(|n| format!("{:?}", n.state).to_lowercase())
                    .unwrap_or_else(|| "unknown".into()),
            ]
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = Client::new(manager_urls(&cli.manager)?).with_token(cli.token.clone());
    if let Some(ca) = &cli.manager_ca {
        client = client.with_ca_file(ca)?;
    }
    let json = cli.output == Output::Json;
    match cli.cmd {
        Cmd::Up(_) => unreachable!("handled before the runtime starts"),
        Cmd::Net(c) => net::net(&client, c, json).await?,
        Cmd::Port(c) => net::port(&client, c, json).await?,
        Cmd::Switch(c) => net::switch(&client, c, json).await?,
        Cmd::Vip(c) => vip::vip(&client, c, json).await?,
        Cmd::Status(a) => status::status(&client, a, json).await?,
        Cmd::Backup { file } => backup::backup(&client, &file, json).await?,
        Cmd::Restore { file, force } => backup::restore(&client, &file, force, json).await?,
        Cmd::Volume(VolumeCmd::Create {
            name,
            size,
            replicas,
            min_replicas,
        }) => {
            let size = parse_size(&size).map_err(anyhow::Error::msg)?;
            let v = client
                .create_volume(&api::CreateVolume {
                    name,
                    size,
                    replicas,
                    min_replicas,
                })
                .await?;
            if json {
                print_json(&v)?;
            } else {
                let nodes: std::collections::BTreeSet<&str> = v
                    .sets
                    .iter()
                    .flat_map(|s| s.members.iter().map(|m| m.node.as_str()))
                    .collect();
                println!(
                    "created volume {} ({}, id {}, {} {} on {})",
                    v.name,
                    human(v.size),
                    v.id,
                    v.replicas,
                    if v.replicas == 1 {
                        "replica"
                    } else {
                        "replicas"
                    },
                    nodes.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
        }
        Cmd::Volume(VolumeCmd::Verify {
            name,
            secret_file,
            repair,
        }) => {
            let code = verify::run(&client, &name, &secret_file, json, repair).await?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Volume(VolumeCmd::Import {
            name,
            file,
            format,
            create,
            replicas,
            nbd,
        }) => {
            transfer::import(
                &client,
                transfer::ImportArgs {
                    name: &name,
                    file: &file,
                    format,
                    create,
                    replicas,
                    nbd: nbd.as_deref(),
                    json,
                },
            )
            .await?
        }
        Cmd::Volume(VolumeCmd::Export {
            name,
            file,
            format,
            nbd,
        }) => transfer::export(&client, &name, &file, format, nbd.as_deref(), json).await?,
        Cmd::Volume(VolumeCmd::Ls) => {
            let l = client.list_volumes().await?;
            if json {
                print_json(&l.items)?;
            } else {
                table::print(
                    &["NAME", "ID", "SIZE", "REPLICAS", "CHUNK"],
                    &volume_rows(&l.items),
                );
            }
        }
        Cmd::Volume(VolumeCmd::Set { name, min_replicas }) => {
            let v = client
                .update_volume(
                    &name,
                    &api::UpdateVolume {
                        min_replicas: Some(min_replicas),
                        ..Default::default()
                    },
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "volume {name}: min_replicas {} of {} (gateways use it from their next attach)",
                    v.min_replicas, v.replicas
                );
            }
        }
        Cmd::Volume(VolumeCmd::Show { name }) => {
            let v = client.get_volume(&name).await?;
            let lease = match client.get_lease(&name).await {
                Ok(l) => Some(l),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            let nodes = client.list_nodes().await?.items;
            if json {
                let mut j = serde_json::to_value(&v)?;
                j["lease"] = serde_json::to_value(&lease)?;
                print_json(&j)?;
            } else {
                let rows = [
                    ("name", v.name.clone()),
                    ("id", v.id.to_string()),
                    ("size", format!("{} ({} bytes)", human(v.size), v.size)),
                    ("replicas", v.replicas.to_string()),
                    ("min replicas", v.min_replicas.to_string()),
                    (
                        "lease",
                        match &lease {
                            Some(l) => format!("{} (epoch {})", l.holder, l.epoch),
                            None => "none".into(),
                        },
                    ),
                    ("chunk size", human(v.chunk_size)),
                    ("chunks", v.size.div_ceil(v.chunk_size).to_string()),
                    ("chunk sets", v.sets.len().to_string()),
                    ("created", ago(v.created_ms)),
                    ("NBD export", v.name.clone()),
                ];
                for (k, val) in rows {
                    println!("{k:<12} {val}");
                }
                println!();
                if v.sets.is_empty() {
                    println!("no placement recorded (a volume from before replication)");
                } else {
                    table::print(
                        &["SETS", "NODE", "ZONE", "STATE", "NODE-STATE"],
                        &replica_rows(&v, &nodes),
                    );
                }
            }
        }
        Cmd::Volume(VolumeCmd::Rm { name }) => {
            client.delete_volume(&name).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted volume {name}");
            }
        }
        Cmd::Node(NodeCmd::Drain {
            name,
            no_wait,
            timeout,
        }) => {
            let code = node::drain(&client, &name, no_wait, timeout, json).await?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Node(NodeCmd::Rm { name }) => node::rm(&client, &name).await?,
        Cmd::Node(NodeCmd::Ls) => node::ls(&client, json).await?,
        Cmd::Disk(DiskCmd::Ls) => {
            let l = client.list_disks().await?;
            if json {
                print_json(&l.items)?;
            } else {
                let rows: Vec<Vec<String>> = l
                    .items
                    .iter()
                    .map(|d| {
                        let pct = if d.capacity == 0 {
                            0.0
                        } else {
                            100.0 * d.used as f64 / d.capacity as f64
                        };
                        vec![
                            d.node.clone(),
                            d.path.clone(),
                            human(d.capacity),
                            human(d.used),
                            format!("{pct:.1}%"),
                        ]
                    })
                    .collect();
                table::print(&["NODE", "PATH", "CAPACITY", "USED", "USE%"], &rows);
            }
        }
    }
    Ok(())
}

/// Restores the default SIGPIPE action, so `fabctl volume ls | head` ends quietly when the
/// reader goes instead of panicking on a failed print (Rust programs start with SIGPIPE
/// ignored). Not for `fabctl up`, whose daemons must see EPIPE as an error on a socket.
fn default_sigpipe() {
    // SAFETY: signal(2) with a valid signal number and SIG_DFL; called at start-up on the main
    // thread before any other thread exists, and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Up(_)) {
        default_sigpipe();
    }
    let r = match cli.cmd {
        Cmd::Up(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            up::run(args)
        }
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
            .and_then(|rt| rt.block_on(run(cli))),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain.
            let mut msg = format!("{e:#}").replace('\n', " ");
            if let Some(volume_mgr::client::ClientError::Api { status: 401, .. }) =
                e.downcast_ref::<volume_mgr::client::ClientError>()
            {
                msg.push_str(" (give a token with --token or FABRIC_TOKEN)");
            }
            eprintln!("fabctl: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_urls_are_checked() {
        assert_eq!(
            manager_urls("http://a:1/, http://b:2").unwrap(),
            vec!["http://a:1", "http://b:2"]
        );
        assert_eq!(manager_urls("https://a:1").unwrap(), vec!["https://a:1"]);
        for bad in ["", ",", "a:1", "ftp://a:1", "http://", "http://a:1/v1"] {
            assert!(manager_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn set_ranges_are_short() {
        assert_eq!(set_ranges(&[]), "");
        assert_eq!(set_ranges(&[3]), "3");
        assert_eq!(set_ranges(&[0, 1]), "0,1");
        assert_eq!(set_ranges(&[0, 1, 2, 3, 5, 7, 8, 9, 31]), "0-3,5,7-9,31");
    }

    fn vol(sets: Vec<Vec<(&str, bool)>>) -> api::Volume {
        api::Volume {
            name: "v".into(),
            id: 1,
            size: 1 << 30,
            chunk_size: api::DEFAULT_CHUNK_SIZE,
            replicas: 2,
            min_replicas: 2,
            sets: sets
                .into_iter()
                .map(|ms| api::ChunkSet {
                    members: ms
                        .into_iter()
                        .map(|(n, i)| api::Member {
                            node: n.into(),
                            in_service: i,
                        })
                        .collect(),
                })
                .collect(),
            created_ms: 0,
        }
    }

    #[test]
    fn replica_rows_group_by_node_and_state() {
        let node = |name: &str, state| api::Node {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            nbd_address: String::new(),
            nbd_socket: None,
            zone: format!("z-{name}"),
            state,
            last_heartbeat_ms: 0,
            registered_ms: 0,
        };
        let nodes = [
            node("a", api::NodeState::Up),
            node("b", api::NodeState::Down),
        ];
        let v = vol(vec![
            vec![("a", true), ("b", false)],
            vec![("b", true), ("a", true)],
            vec![("a", true), ("c", true)],
        ]);
        let rows = replica_rows(&v, &nodes);
        let want = [
            ["all 3", "a", "z-a", "in-service", "up"],
            ["1", "b", "z-b", "in-service", "down"],
            ["0", "b", "z-b", "out-of-service", "down"],
            ["2", "c", "-", "in-service", "unknown"],
        ];
        assert_eq!(rows, want.map(|r| r.map(String::from).to_vec()).to_vec());
    }

    #[test]
    fn humans() {
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 B");
    }
}
