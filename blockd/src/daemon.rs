//! Starting and stopping blockd: the chunk store, the NBD listeners, the agent loops and the
//! HTTP endpoint (`/metrics`, `/healthz`). `fabctl up` runs this in-process.

use crate::agent::{self, ManagerLookup};
use crate::chunkstore::{ChunkStore, StoreError};
use crate::config::Config;
use crate::gateway::{self, GatewayConfig};
use crate::nbdgw as nbd;
use crate::replica::server::ReplicaServer;
use crate::replica::service::ReplicaService;
use crate::volume::VolumeCatalog;
use std::future::Future;
use std::sync::Arc;
use volume_mgr::client::Client;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("flushing the chunk store at shutdown failed: {0}")]
    Close(String),
    #[error("{0}")]
    Other(String),
}

type Catalog = VolumeCatalog<ManagerLookup>;

/// Runs blockd until `shutdown` resolves, then stops accepting, flushes and marks the disks
/// clean.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    let disks = cfg.disks.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || ChunkStore::open(&disks))
            .await
            .map_err(|e| DaemonError::Other(format!("opening disks: {e}")))??,
    );
    store.set_full_ratio(cfg.full_ratio);
    let client = Client::new(cfg.manager.clone())
        .with_auth(cfg.manager_token.clone(), cfg.manager_ca.as_deref())
        .map_err(|e| DaemonError::Other(format!("manager client: {e}")))?;
    let (verified, verified_rx) = tokio::sync::watch::channel(false);
    let service = Arc::new(ReplicaService::new(store.clone()));
    let gw = gateway::Ctx::new(
        GatewayConfig {
            node: cfg.node.clone(),
            replica_timeout: cfg.replica_timeout,
            min_replicas_wait: cfg.min_replicas_wait,
            secret: cfg.secret.clone(),
            recovery_bandwidth: cfg.recovery_bandwidth,
        },
        client.clone(),
        service.clone(),
    );
    let catalog: Arc<Catalog> = Arc::new(VolumeCatalog::replicated(
        store.clone(),
        ManagerLookup {
            client: client.clone(),
            verified: verified_rx.clone(),
        },
        gw.clone(),
    ));
    let metrics = Arc::new(nbd::NbdMetrics::default());
    let scrubber = Arc::new(crate::scrub::Scrubber::new(
        store.clone(),
        gw.clone(),
        cfg.scrub_rate,
        cfg.scrub_interval,
    ));

    let mut tasks = tokio::task::JoinSet::new();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The replica protocol: bound now, served once the disks' cluster is verified and the
    // fences are loaded from the manager's leases (so a restart forgets no fence).
    if let Some(secret) = cfg.secret.clone() {
        let l = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "replica protocol",
                addr: cfg.listen.to_string(),
                source,
            })?;
        tracing::info!(addr = %cfg.listen, "replica protocol listening");
        let service = service.clone();
        let client = client.clone();
        let node = cfg.node.clone();
        let mut verified = verified_rx.clone();
        tasks.spawn(async move {
            if verified.wait_for(|v| *v).await.is_err() {
                return;
            }
            load_fences(&client, &service).await;
            let server = Arc::new(ReplicaServer {
                cluster_id: service.store.cluster_id(),
                service,
                secret,
                node,
            });
            server.serve(l).await;
        });
    } else {
        tracing::warn!("no --secret-file: the replica protocol is off; only volumes whose replicas are all on this host can be served");
    }
    if let Some(addr) = cfg.nbd_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "NBD",
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(%addr, "NBD listening on TCP");
        tasks.spawn(nbd::serve_tcp(
            l,
            catalog.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }
    if let Some(path) = &cfg.nbd_socket {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        // A socket left by a previous run (kill -9) would make bind fail.
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let l = tokio::net::UnixListener::bind(path).map_err(|source| DaemonError::Listen {
            what: "NBD socket",
            addr: path.display().to_string(),
            source,
        })?;
        tracing::info!(path = %path.display(), "NBD listening on unix socket");
        tasks.spawn(nbd::serve_unix(
            l,
            catalog.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }
    if let Some(addr) = cfg.http_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "HTTP",
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        let app = http_router(
            store.clone(),
            metrics.clone(),
            gw.clone(),
            scrubber.clone(),
            service.clone(),
        );
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        });
    }

    // Listeners are bound: now tell the manager we are here.
    let mut agents = tokio::task::JoinSet::new();
    agents.spawn(agent::heartbeat_loop(
        cfg.clone(),
        client.clone(),
        store.clone(),
    ));
    agents.spawn(agent::watch_loop(
        client.clone(),
        catalog.clone(),
        verified,
        cfg.node.clone(),
    ));
    agents.spawn(gateway::report_progress(gw.clone()));
    {
        // The scrub starts once the disks' cluster is verified (repairs need the peers).
        let mut verified = verified_rx.clone();
        let scrubber = scrubber.clone();
        agents.spawn(async move {
            if verified.wait_for(|v| *v).await.is_ok() {
                scrubber.run().await;
            }
        });
    }

    shutdown.await;
    tracing::info!("blockd stopping");
    agents.abort_all();
    let _ = stop_tx.send(true);
    // The accept loops and the HTTP server stop at once; give them a moment, then go on.
    let drain = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    tasks.abort_all();
    if let Some(path) = &cfg.nbd_socket {
        let _ = std::fs::remove_file(path);
    }
    store
        .close()
        .await
        .map_err(|e| DaemonError::Close(e.to_string()))?;
    tracing::info!("blockd stopped cleanly");
    Ok(())
}

/// Raises every volume's fence to its current lease epoch (retrying until the manager
/// answers: serving replicas with no fences could let a fenced gateway write).
async fn load_fences(client: &Client, service: &ReplicaService) {
    let mut failures = 0u32;
    loop {
        let r = async {
            let leases = client.list_leases().await?;
            let vols = client.list_volumes().await?;
            Ok::<_, volume_mgr::client::ClientError>((leases.items, vols.items))
        }
        .await;
        match r {
            Ok((leases, vols)) => {
                for l in leases {
                    if let Some(v) = vols.iter().find(|v| v.name == l.volume) {
                        service.fences.admit(v.id, l.epoch);
                    }
                }
                return;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "cannot load lease epochs yet; replica protocol waits");
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

fn http_router(
    store: Arc<ChunkStore>,
    metrics: Arc<nbd::NbdMetrics>,
    gw: Arc<gateway::Ctx>,
    scrubber: Arc<crate::scrub::Scrubber>,
    metrics_service: Arc<ReplicaService>,
) -> axum::Router {
    use axum::routing::{get, post};
    let s2 = scrubber.clone();
    let st2 = store.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // Starts a scrub pass now (when the scrub is on).
        .route(
            "/debug/scrub",
            post(move || {
                let s = s2.clone();
                async move {
                    s.kick.notify_one();
                    "scrub pass requested\n"
                }
            }),
        )
        // Where a chunk's data lives on disk: `PATH OFFSET` (diagnostics, damage tests).
        .route(
            "/debug/chunks/{volume}/{index}",
            get(
                move |axum::extract::Path((volume, index)): axum::extract::Path<(u64, u64)>| {
                    let st = st2.clone();
                    async move {
                        match st.locate(crate::chunkstore::layout::ChunkKey { volume, index }) {
                            Some((p, off)) => (
                                axum::http::StatusCode::OK,
                                format!("{} {off}\n", p.display()),
                            ),
                            None => (
                                axum::http::StatusCode::NOT_FOUND,
                                "chunk not stored here\n".to_string(),
                            ),
                        }
                    }
                },
            ),
        )
        .route(
            "/metrics",
            get(move || {
                let store = store.clone();
                let metrics = metrics.clone();
                let gw = gw.clone();
                let scrubber = scrubber.clone();
                let service = metrics_service.clone();
                async move {
                    let mut out = String::new();
                    let _ = std::fmt::Write::write_fmt(&mut out, format_args!(
                        "# HELP blockd_replica_stale_writes_total Writes refused as older than the chunk's resynced copy (late requests from a connection the gateway gave up).\n# TYPE blockd_replica_stale_writes_total counter\nblockd_replica_stale_writes_total {}\n",
                        service.stale_writes.load(std::sync::atomic::Ordering::Relaxed)
                    ));
                    scrubber.metrics.render_prometheus(&mut out);
                    store.render_prometheus(&mut out);
                    metrics.render_prometheus(&mut out);
                    gw.metrics.render_prometheus(&mut out);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        out,
                    )
                }
            }),
        )
}
