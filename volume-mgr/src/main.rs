//! volume-mgr: flags and config, logging, signals.

use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;
use volume_mgr::Config;

/// Fabric control plane: cluster state and the /v1 HTTP/JSON API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML config file (kebab-case keys, same names as the flags; flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// API address [default: 127.0.0.1:7700]
    #[arg(long)]
    listen: Option<String>,
    /// Where the state lives [required, here or in the config file]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// State store: embedded (a redb file in --data-dir) or etcd
    #[arg(long)]
    store: Option<String>,
    /// etcd endpoints (with --store etcd)
    #[arg(long)]
    etcd_endpoints: Option<String>,
    /// A node without heartbeat for this long is down [default: 5s]
    #[arg(long)]
    down_after: Option<String>,
    /// Provisioned bytes allowed per byte of disk capacity [default: 1.0]
    #[arg(long)]
    overcommit: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    etcd_endpoints: Option<String>,
    down_after: Option<String>,
    overcommit: Option<f64>,
}

fn config(a: Args) -> Result<Config, String> {
    let f: File = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).map_err(|e| format!("config {}: {e}", p.display()))?,
        )
        .map_err(|e| format!("config {}: {e}", p.display()))?,
        None => File::default(),
    };
    match a.store.or(f.store).as_deref() {
        None | Some("embedded") => {}
        Some("etcd") => {
            let _ = a.etcd_endpoints.or(f.etcd_endpoints);
            return Err("--store etcd is not supported yet (use the embedded store)".into());
        }
        Some(o) => return Err(format!("--store {o:?}: use embedded or etcd")),
    }
    let d = Config::default();
    let listen = a.listen.or(f.listen).unwrap_or(d.listen);
    listen
        .parse::<std::net::SocketAddr>()
        .map_err(|_| format!("listen: {listen:?} is not an IP:PORT address"))?;
    Ok(Config {
        listen,
        data_dir: a.data_dir.or(f.data_dir).ok_or("--data-dir is required")?,
        down_after: match a.down_after.or(f.down_after) {
            Some(s) => {
                volume_mgr::humantime_serde::parse(&s).map_err(|e| format!("down-after: {e}"))?
            }
            None => d.down_after,
        },
        overcommit: a.overcommit.or(f.overcommit).unwrap_or(d.overcommit),
    })
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match config(Args::parse()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(&format!("tokio runtime: {e}")),
    };
    let r = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        volume_mgr::serve(cfg, listener, shutdown_signal()).await
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> std::process::ExitCode {
    eprintln!("volume-mgr: {msg}");
    std::process::ExitCode::FAILURE
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
