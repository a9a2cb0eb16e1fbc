//! vswitch: flags and config, logging, signals; everything else is in the library.

use clap::Parser;
use std::path::PathBuf;
use vswitch::config::FileConfig;

/// Fabric virtual switch: per-tenant overlay networks (VXLAN) for this host's VMs and namespaces.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML config file (kebab-case keys, same names as the flags; flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// volume-mgr URL(s), comma-separated [default: http://127.0.0.1:7700]
    #[arg(long)]
    manager: Option<String>,
    /// Bearer token for volume-mgr when it has tokens configured (an admin token: agents write)
    #[arg(long)]
    manager_token: Option<String>,
    /// PEM CA certificate to trust for an https:// volume-mgr (e.g. its self-signed certificate)
    #[arg(long)]
    manager_ca: Option<PathBuf>,
    /// Node name [default: the host name]
    #[arg(long)]
    node: Option<String>,
    /// This host's IPv4 address on the underlay (the VTEP address). Required.
    #[arg(long)]
    underlay_ip: Option<String>,
    /// UDP port of VXLAN [default: 4789]
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// /metrics and /healthz address ("none" to disable) [default: 127.0.0.1:7900]
    #[arg(long)]
    http_listen: Option<String>,
    /// Heartbeat (and port counters report) period [default: 1s]
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// Send sockets, one source port each, chosen by the inner flow's hash [default: 8]
    #[arg(long)]
    tx_sockets: Option<usize>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let file = match &args.config {
        Some(p) => match FileConfig::from_file(p) {
            Ok(f) => f,
            Err(e) => return fail(&e),
        },
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        manager: args.manager,
        manager_token: args.manager_token,
        manager_ca: args.manager_ca,
        node: args.node,
        underlay_ip: args.underlay_ip,
        vxlan_port: args.vxlan_port,
        http_listen: args.http_listen,
        heartbeat_interval: args.heartbeat_interval,
        tx_sockets: args.tx_sockets,
    };
    let cfg = match file.overlay(flags).resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vswitch")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("tokio runtime: {e}")),
    };
    match rt.block_on(vswitch::daemon::run(cfg, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn fail(msg: &str) -> std::process::ExitCode {
    eprintln!("vswitch: {msg}");
    std::process::ExitCode::FAILURE
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
