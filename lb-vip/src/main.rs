//! lb-vip: flags and config, logging, signals; everything else is in the library.

use clap::Parser;
use lb_vip::config::FileConfig;
use std::path::PathBuf;

/// Fabric load-balanced virtual IPs: TCP/UDP proxy with health checks, persistence and
/// draining, configured from volume-mgr.
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
    /// Node name (the key of this instance's VIP reports) [default: the host name]
    #[arg(long)]
    node: Option<String>,
    /// /metrics and /healthz address ("none" to disable) [default: 127.0.0.1:7950]
    #[arg(long)]
    http_listen: Option<String>,
    /// Period of the status reports to volume-mgr [default: 1s]
    #[arg(long)]
    report_interval: Option<String>,
    /// Backend connect timeout; a timeout takes the backend down at once [default: 1s]
    #[arg(long)]
    connect_timeout: Option<String>,
    /// A UDP flow without traffic this long is forgotten [default: 30s]
    #[arg(long)]
    udp_idle_timeout: Option<String>,
    /// High availability: serve a VIP only while holding its lease from volume-mgr, adding
    /// its address to this interface (and announcing it by gratuitous ARP); without it every
    /// VIP whose address is local is served
    #[arg(long)]
    vip_interface: Option<String>,
    /// Prefix of the network namespaces that hold overlay VIPs (one per network: PREFIX +
    /// network name) [default: fabvip-]
    #[arg(long)]
    overlay_netns_prefix: Option<String>,
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
        http_listen: args.http_listen,
        report_interval: args.report_interval,
        connect_timeout: args.connect_timeout,
        udp_idle_timeout: args.udp_idle_timeout,
        vip_interface: args.vip_interface,
        overlay_netns_prefix: args.overlay_netns_prefix,
    };
    let cfg = match file.overlay(flags).resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .thread_name("lb-vip")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("tokio runtime: {e}")),
    };
    match rt.block_on(lb_vip::daemon::run(cfg, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn fail(msg: &str) -> std::process::ExitCode {
    eprintln!("lb-vip: {msg}");
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
