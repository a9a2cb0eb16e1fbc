//! fabctl: the one CLI for Fabric operators.

mod size;
mod table;
mod up;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use volume_mgr::api;
use volume_mgr::client::Client;

#[derive(Parser, Debug)]
#[command(
    name = "fabctl",
    version,
    about = "Operate a Fabric cluster: volumes, nodes, disks; `fabctl up` for one host"
)]
struct Cli {
    /// volume-mgr URL(s), comma-separated (tried in order): http://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "FABRIC_MANAGER",
        default_value = "http://127.0.0.1:7700"
    )]
    manager: String,
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
    /// Run the single-host all-in-one (volume-mgr + blockd) until Ctrl-C.
    Up(up::UpArgs),
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
    },
    /// List volumes.
    Ls,
    /// Show one volume.
    Show { name: String },
    /// Delete a volume and its data.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes with their state.
    Ls,
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// List disks with capacity and use.
    Ls,
}

pub use size::parse_size;

/// The `--manager` value: one or more `http://HOST:PORT` URLs, comma-separated.
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
        let host = u.strip_prefix("http://").ok_or_else(|| {
            anyhow::anyhow!("--manager {u:?}: expected http://HOST:PORT (https is not supported)")
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(manager_urls(&cli.manager)?);
    let json = cli.output == Output::Json;
    match cli.cmd {
        Cmd::Up(_) => unreachable!("handled before the runtime starts"),
        Cmd::Volume(VolumeCmd::Create { name, size }) => {
            let size = parse_size(&size).map_err(anyhow::Error::msg)?;
            let v = client
                .create_volume(&api::CreateVolume { name, size })
                .await?;
            if json {
                print_json(&v)?;
            } else {
                println!("created volume {} ({}, id {})", v.name, human(v.size), v.id);
            }
        }
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
        Cmd::Volume(VolumeCmd::Show { name }) => {
            let v = client.get_volume(&name).await?;
            if json {
                print_json(&v)?;
            } else {
                let rows = [
                    ("name", v.name.clone()),
                    ("id", v.id.to_string()),
                    ("size", format!("{} ({} bytes)", human(v.size), v.size)),
                    ("replicas", v.replicas.to_string()),
                    ("chunk size", human(v.chunk_size)),
                    ("chunks", v.size.div_ceil(v.chunk_size).to_string()),
                    ("created", ago(v.created_ms)),
                    ("NBD export", v.name.clone()),
                ];
                for (k, val) in rows {
                    println!("{k:<11} {val}");
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
        Cmd::Node(NodeCmd::Ls) => {
            let l = client.list_nodes().await?;
            if json {
                print_json(&l.items)?;
            } else {
                let rows: Vec<Vec<String>> = l
                    .items
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            format!("{:?}", n.state).to_lowercase(),
                            n.zone.clone(),
                            n.address.clone(),
                            n.nbd_address.clone(),
                            ago(n.last_heartbeat_ms),
                        ]
                    })
                    .collect();
                table::print(
                    &["NAME", "STATE", "ZONE", "ADDRESS", "NBD", "HEARTBEAT"],
                    &rows,
                );
            }
        }
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
            let msg = format!("{e:#}").replace('\n', " ");
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
        for bad in ["", ",", "a:1", "https://a:1", "http://", "http://a:1/v1"] {
            assert!(manager_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn humans() {
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 B");
    }
}
