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
    /// etcd client URLs, comma-separated (with --store etcd): http://HOST:2379,…
    #[arg(long)]
    etcd_endpoints: Option<String>,
    /// Key prefix of this cluster in etcd [default: /fabric/]
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// This manager's URL as agents and the other managers reach it; its identity in the
    /// leader election [default: http://LISTEN]
    #[arg(long)]
    advertise_url: Option<String>,
    /// A node without heartbeat for this long is down [default: 5s]
    #[arg(long)]
    down_after: Option<String>,
    /// A node down for this long (after --down-after) has its replicas re-homed [default: 60s]
    #[arg(long)]
    out_after: Option<String>,
    /// Provisioned bytes allowed per byte of disk capacity [default: 1.0]
    #[arg(long)]
    overcommit: Option<f64>,
    /// Replicas of a volume created without --replicas [default: 3]
    #[arg(long)]
    default_replicas: Option<u32>,
    /// A disk this full (used / capacity, from heartbeats) takes no new chunks [default: 0.95]
    #[arg(long)]
    full_ratio: Option<f64>,
    /// A node must be up this long before chunk sets move to it (rebalancing) [default: 30s]
    #[arg(long)]
    rebalance_after: Option<String>,
    /// Never move chunk sets to added nodes or disks (drains and re-replication still run)
    #[arg(long)]
    no_rebalance: bool,
    /// TOML file of bearer tokens (`[[tokens]] token = "…" role = "admin"|"read-only"`), added to
    /// the config's `[[tokens]]`. No token anywhere: the API is open [default]
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// PEM certificate (chain) to serve HTTPS with (with --tls-key)
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    etcd_endpoints: Option<String>,
    etcd_prefix: Option<String>,
    advertise_url: Option<String>,
    down_after: Option<String>,
    out_after: Option<String>,
    overcommit: Option<f64>,
    default_replicas: Option<u32>,
    full_ratio: Option<f64>,
    rebalance: Option<bool>,
    rebalance_after: Option<String>,
    #[serde(default)]
    tokens: Vec<volume_mgr::auth::Token>,
    tokens_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

fn config(a: Args) -> Result<Config, String> {
    let f: File = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| format!("config {}: {e}", p.display()))?;
            toml::from_str(&text).map_err(|e| {
                // One line: `config FILE:LINE: message` (toml's own Display draws a snippet).
                let line = e
                    .span()
                    .map(|s| {
                        format!(
                            ":{}",
                            text[..s.start.min(text.len())].matches('\n').count() + 1
                        )
                    })
                    .unwrap_or_default();
                format!("config {}{line}: {}", p.display(), e.message().trim())
            })?
        }
        None => File::default(),
    };
    let mut tokens = f.tokens;
    if let Some(p) = a.tokens_file.or(f.tokens_file) {
        tokens.extend(volume_mgr::auth::load_tokens_file(&p)?);
    }
    volume_mgr::auth::validate(&tokens)?;
    let (tls_cert, tls_key) = (a.tls_cert.or(f.tls_cert), a.tls_key.or(f.tls_key));
    if tls_cert.is_some() != tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    let d = Config::default();
    let store = a.store.or(f.store).unwrap_or_else(|| d.store.clone());
    let etcd_endpoints: Vec<String> = a
        .etcd_endpoints
        .or(f.etcd_endpoints)
        .map(|e| {
            e.split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect()
        })
        .unwrap_or_default();
    match store.as_str() {
        "embedded" => {
            if !etcd_endpoints.is_empty() {
                return Err("--etcd-endpoints needs --store etcd".into());
            }
        }
        "etcd" => {
            if etcd_endpoints.is_empty() {
                return Err("--store etcd needs --etcd-endpoints http://HOST:2379,…".into());
            }
            for u in &etcd_endpoints {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(format!("etcd endpoint {u:?}: give http://HOST:PORT"));
                }
            }
        }
        o => return Err(format!("--store {o:?}: use embedded or etcd")),
    }
    let advertise_url = a.advertise_url.or(f.advertise_url);
    if let Some(u) = &advertise_url {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || u.contains(char::is_whitespace)
        {
            return Err(format!("advertise-url {u:?}: give http://HOST:PORT"));
        }
    }
    let listen = a.listen.or(f.listen).unwrap_or(d.listen);
    listen
        .parse::<std::net::SocketAddr>()
        .map_err(|_| format!("listen: {listen:?} is not an IP:PORT address"))?;
    Ok(Config {
        listen,
        data_dir: match a.data_dir.or(f.data_dir) {
            Some(d) => d,
            // With etcd the manager keeps nothing on disk.
            None if store == "etcd" => d.data_dir.clone(),
            None => return Err("--data-dir is required".into()),
        },
        down_after: match a.down_after.or(f.down_after) {
            Some(s) => match volume_mgr::humantime_serde::parse(&s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return Err("down-after must be more than 0".into()),
                Err(e) => return Err(format!("down-after: {e}")),
            },
            None => d.down_after,
        },
        out_after: match a.out_after.or(f.out_after) {
            Some(s) => match volume_mgr::humantime_serde::parse(&s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return Err("out-after must be more than 0".into()),
                Err(e) => return Err(format!("out-after: {e}")),
            },
            None => d.out_after,
        },
        overcommit: match a.overcommit.or(f.overcommit) {
            Some(o) if o > 0.0 && o.is_finite() => o,
            Some(o) => return Err(format!("overcommit must be a positive number, got {o}")),
            None => d.overcommit,
        },
        default_replicas: match a.default_replicas.or(f.default_replicas) {
            Some(r) if (1..=16).contains(&r) => r,
            Some(r) => return Err(format!("default-replicas must be 1..=16, got {r}")),
            None => d.default_replicas,
        },
        full_ratio: match a.full_ratio.or(f.full_ratio) {
            Some(r) if r > 0.0 && r <= 1.0 => r,
            Some(r) => return Err(format!("full-ratio must be in (0, 1], got {r}")),
            None => d.full_ratio,
        },
        store,
        etcd_endpoints,
        etcd_prefix: a.etcd_prefix.or(f.etcd_prefix).unwrap_or(d.etcd_prefix),
        advertise_url,
        rebalance: !a.no_rebalance && f.rebalance.unwrap_or(d.rebalance),
        rebalance_after: match a.rebalance_after.or(f.rebalance_after) {
            Some(s) => volume_mgr::humantime_serde::parse(&s)
                .map_err(|e| format!("rebalance-after: {e}"))?,
            None => d.rebalance_after,
        },
        tokens,
        tls_cert,
        tls_key,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(args: &[&str]) -> Result<Config, String> {
        config(
            Args::try_parse_from(std::iter::once("volume-mgr").chain(args.iter().copied()))
                .unwrap(),
        )
    }

    #[test]
    fn defaults_and_flags() {
        let c = cfg(&["--data-dir", "/d"]).unwrap();
        assert_eq!(
            c,
            Config {
                data_dir: "/d".into(),
                ..Config::default()
            }
        );
        let c = cfg(&[
            "--data-dir",
            "/d",
            "--listen",
            "0.0.0.0:1",
            "--down-after",
            "1500ms",
            "--overcommit",
            "2.5",
            "--store",
            "embedded",
        ])
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:1");
        assert_eq!(c.down_after, Duration::from_millis(1500));
        assert_eq!(c.out_after, Duration::from_secs(60));
        let o = cfg(&["--data-dir", "/d", "--out-after", "5s"]).unwrap();
        assert_eq!(o.out_after, Duration::from_secs(5));
        assert_eq!(c.overcommit, 2.5);
        assert_eq!(c.default_replicas, 3);
        let c = cfg(&["--data-dir", "/d", "--default-replicas", "1"]).unwrap();
        assert_eq!(c.default_replicas, 1);
    }

    #[test]
    fn config_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9\"\ndata-dir = \"/from-file\"\ndown-after = \"2m\"\nout-after = \"10m\"\novercommit = 3.0\ndefault-replicas = 2\n",
        )
        .unwrap();
        let p = f.to_str().unwrap();
        let c = cfg(&["--config", p]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9");
        assert_eq!(c.data_dir, std::path::PathBuf::from("/from-file"));
        assert_eq!(c.down_after, Duration::from_secs(120));
        assert_eq!(c.out_after, Duration::from_secs(600));
        assert_eq!(c.overcommit, 3.0);
        assert_eq!(c.default_replicas, 2);
        let c = cfg(&[
            "--config",
            p,
            "--listen",
            "127.0.0.1:10",
            "--down-after",
            "7s",
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:10");
        assert_eq!(c.down_after, Duration::from_secs(7));
        assert_eq!(c.data_dir, std::path::PathBuf::from("/from-file"));
        std::fs::write(&f, "data-dir = \"/x\"\nlisten_addr = \"1\"\n").unwrap();
        let e = cfg(&["--config", p]).unwrap_err();
        assert!(e.contains("unknown field") && e.contains("m.toml"), "{e}");
    }

    #[test]
    fn clear_errors() {
        let e = |args: &[&str]| cfg(args).unwrap_err();
        assert!(e(&[]).contains("--data-dir is required"));
        assert!(e(&["--data-dir", "/d", "--store", "etcd"]).contains("needs --etcd-endpoints"));
        assert!(e(&["--store", "etcd", "--etcd-endpoints", "h:1"]).contains("http://HOST:PORT"));
        assert!(e(&["--data-dir", "/d", "--etcd-endpoints", "http://h:1"]).contains("--store etcd"));
        assert!(e(&["--data-dir", "/d", "--advertise-url", "x y"]).contains("advertise-url"));
        let c = cfg(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:1, http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(c.etcd_endpoints.len(), 2);
        assert_eq!(c.etcd_prefix, "/fabric/");
        assert!(e(&["--data-dir", "/d", "--store", "zk"]).contains("embedded or etcd"));
        assert!(e(&["--data-dir", "/d", "--listen", "nowhere"]).contains("IP:PORT"));
        assert!(e(&["--data-dir", "/d", "--down-after", "5 parsecs"]).contains("down-after"));
        assert!(e(&["--data-dir", "/d", "--down-after", "0s"]).contains("more than 0"));
        assert!(e(&["--data-dir", "/d", "--out-after", "0s"]).contains("out-after"));
        assert!(e(&["--data-dir", "/d", "--out-after", "soon"]).contains("out-after"));
        assert!(e(&["--data-dir", "/d", "--overcommit", "0"]).contains("positive"));
        assert!(e(&["--data-dir", "/d", "--full-ratio", "1.5"]).contains("full-ratio"));
        assert_eq!(
            cfg(&["--data-dir", "/d", "--full-ratio", "0.8"])
                .unwrap()
                .full_ratio,
            0.8
        );
        assert_eq!(cfg(&["--data-dir", "/d"]).unwrap().full_ratio, 0.95);
        let d = cfg(&["--data-dir", "/d"]).unwrap();
        assert!(d.rebalance);
        assert_eq!(d.rebalance_after, Duration::from_secs(30));
        let r = cfg(&[
            "--data-dir",
            "/d",
            "--no-rebalance",
            "--rebalance-after",
            "2s",
        ])
        .unwrap();
        assert!(!r.rebalance);
        assert_eq!(r.rebalance_after, Duration::from_secs(2));
        assert!(e(&["--data-dir", "/d", "--rebalance-after", "soon"]).contains("rebalance-after"));
        assert!(e(&["--data-dir", "/d", "--default-replicas", "0"]).contains("1..=16"));
        assert!(e(&["--data-dir", "/d", "--default-replicas", "17"]).contains("1..=16"));
        assert!(e(&["--config", "/nonexistent/m.toml"]).contains("/nonexistent/m.toml"));
        assert!(e(&["--data-dir", "/d", "--tls-cert", "/c.pem"]).contains("go together"));
        assert!(
            e(&["--data-dir", "/d", "--tokens-file", "/nonexistent/t.toml"])
                .contains("/nonexistent/t.toml")
        );
    }

    #[test]
    fn tokens_from_config_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        let t = dir.path().join("t.toml");
        std::fs::write(
            &f,
            "data-dir = \"/d\"\n[[tokens]]\ntoken = \"admin-token-0123456789\"\nrole = \"admin\"\n",
        )
        .unwrap();
        std::fs::write(
            &t,
            "[[tokens]]\ntoken = \"reader-token-0123456789\"\nrole = \"read-only\"\n",
        )
        .unwrap();
        let c = cfg(&["--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(c.tokens.len(), 1);
        let c = cfg(&[
            "--config",
            f.to_str().unwrap(),
            "--tokens-file",
            t.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            c.tokens.iter().map(|t| t.role).collect::<Vec<_>>(),
            [
                volume_mgr::auth::Role::Admin,
                volume_mgr::auth::Role::ReadOnly
            ]
        );
        std::fs::write(&t, "[[tokens]]\ntoken = \"x\"\nrole = \"root\"\n").unwrap();
        let e = cfg(&["--data-dir", "/d", "--tokens-file", t.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("t.toml") && e.contains("unknown variant"), "{e}");
        std::fs::write(&t, "[[tokens]]\ntoken = \"short\"\nrole = \"admin\"\n").unwrap();
        let e = cfg(&["--data-dir", "/d", "--tokens-file", t.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("16 to 512"), "{e}");
    }
}
