//! blockd: flags and config, logging, signals; everything else is in the library.

use blockd::config::FileConfig;
use clap::Parser;
use std::path::PathBuf;

/// Fabric block daemon: pools this host's disks into a chunk store and serves volumes over NBD.
#[derive(Parser, Debug)]
#[command(version, about, args_override_self = true)]
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
    /// Replica protocol address, IP:PORT [default: 127.0.0.1:7800]
    #[arg(long)]
    listen: Option<String>,
    /// NBD TCP address ("none" to disable) [default: 127.0.0.1:10809]
    #[arg(long)]
    nbd_listen: Option<String>,
    /// NBD unix socket path
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// /metrics and /healthz address ("none" to disable) [default: 127.0.0.1:7801]
    #[arg(long)]
    http_listen: Option<String>,
    /// A disk: file or block device, PATH[:SIZE] (a missing file is created with SIZE). Repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// Failure-domain label (rack) [default: the node name]
    #[arg(long)]
    zone: Option<String>,
    /// Heartbeat period [default: 1s]
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// Async worker threads [default: half the CPUs, at least 1]
    #[arg(long)]
    worker_threads: Option<usize>,
    /// File holding the cluster secret shared by every blockd (replica protocol auth).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Longest wait for a replica's answer before it counts as failed (default 5s).
    #[arg(long)]
    replica_timeout: Option<String>,
    /// How long I/O waits for min_replicas in-service replicas before EIO (default 30s).
    #[arg(long)]
    min_replicas_wait: Option<String>,
    /// Bandwidth of background copies (resync, re-replication), e.g. 100MiB/s; 0 = unlimited
    /// (default 100MiB/s).
    #[arg(long)]
    recovery_bandwidth: Option<String>,
    /// Rate of the background scrub verifying stored checksums, e.g. 8MiB/s; 0 = off
    /// (default 8MiB/s).
    #[arg(long)]
    scrub_rate: Option<String>,
    /// Pause between full scrub passes (default 24h).
    #[arg(long)]
    scrub_interval: Option<String>,
    /// Share of the chunk slots in use past which no new chunk is taken; writes that need
    /// one fail with ENOSPC (default 0.95).
    #[arg(long)]
    full_ratio: Option<f64>,
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
        listen: args.listen,
        nbd_listen: args.nbd_listen,
        nbd_socket: args.nbd_socket,
        http_listen: args.http_listen,
        disk: args.disk,
        zone: args.zone,
        heartbeat_interval: args.heartbeat_interval,
        worker_threads: args.worker_threads,
        secret_file: args.secret_file,
        replica_timeout: args.replica_timeout,
        min_replicas_wait: args.min_replicas_wait,
        recovery_bandwidth: args.recovery_bandwidth,
        scrub_rate: args.scrub_rate,
        scrub_interval: args.scrub_interval,
        full_ratio: args.full_ratio,
    };
    let cfg = match file.overlay(flags).resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .thread_name("blockd")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("tokio runtime: {e}")),
    };
    match rt.block_on(blockd::daemon::run(cfg, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(msg: &str) -> std::process::ExitCode {
    eprintln!("blockd: {msg}");
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
