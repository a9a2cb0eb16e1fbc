//! `fabctl up`: the single-host all-in-one. Runs volume-mgr (embedded store) and blockd (one
//! file-backed disk) in this process, prints how to use them, and stops both cleanly on
//! Ctrl-C. A second `up` on the same data directory finds its volumes again.

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where the manager's state, the disk file and the NBD socket live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// volume-mgr API address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// NBD TCP address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// blockd replica protocol address.
    #[arg(long, default_value = "127.0.0.1:7800")]
    pub blockd_listen: String,
    /// blockd /metrics address.
    #[arg(long, default_value = "127.0.0.1:7801")]
    pub blockd_http_listen: String,
    /// Size of the (thin, sparse) disk file created on first start.
    #[arg(long, default_value = "64G")]
    pub disk_size: String,
    /// Node name [default: the host name].
    #[arg(long)]
    pub node: Option<String>,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(blockd::config::default_worker_threads())
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run_async(args, data_dir))
}

async fn run_async(args: UpArgs, data_dir: PathBuf) -> anyhow::Result<()> {
    let manager_url = format!("http://{}", args.listen);
    let socket = data_dir.join("nbd.sock");
    let disk = data_dir.join("disk0.img");

    // volume-mgr
    let mgr_cfg = volume_mgr::Config {
        listen: args.listen.clone(),
        data_dir: data_dir.join("manager"),
        // One host: volumes have one replica (a multi-host cluster runs the daemons).
        default_replicas: 1,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("volume-mgr cannot listen on {}", args.listen))?;
    let (mgr_stop_tx, mgr_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut manager = tokio::spawn(async move {
        volume_mgr::serve(mgr_cfg, listener, async move {
            let _ = mgr_stop_rx.await;
        })
        .await
    });

    // blockd
    let bcfg = blockd::config::FileConfig {
        manager: Some(manager_url.clone()),
        node: args.node.clone(),
        listen: Some(args.blockd_listen.clone()),
        nbd_listen: Some(args.nbd_listen.clone()),
        nbd_socket: Some(socket.clone()),
        http_listen: Some(args.blockd_http_listen.clone()),
        disk: vec![format!("{}:{}", disk.display(), args.disk_size)],
        zone: None,
        heartbeat_interval: None,
        worker_threads: None,
        ..Default::default()
    }
    .resolve()
    .map_err(anyhow::Error::msg)?;
    let node = bcfg.node.clone();
    let (bd_stop_tx, bd_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut blockd = tokio::spawn(blockd::daemon::run(bcfg, async move {
        let _ = bd_stop_rx.await;
    }));

    // Wait until blockd has registered, or one of them failed.
    let client = volume_mgr::client::Client::new(vec![manager_url.clone()]);
    let start = Instant::now();
    loop {
        if manager.is_finished() {
            let r = (&mut manager).await?;
            r.map_err(|e| anyhow::anyhow!("volume-mgr: {e}"))?;
            bail!("volume-mgr stopped unexpectedly");
        }
        if blockd.is_finished() {
            (&mut blockd).await?.context("blockd stopped")?;
            bail!("blockd stopped unexpectedly");
        }
        // The node record survives restarts; liveness does not: wait for this run's blockd.
        if let Ok(n) = client.get_node(&node).await {
            if n.state == volume_mgr::api::NodeState::Up {
                break;
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("blockd did not register with volume-mgr within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let volumes = client
        .list_volumes()
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    println!("Fabric is up (data in {}).", data_dir.display());
    println!("  manager   {manager_url}   (fabctl talks to it by default)");
    println!(
        "  NBD       nbd://{}/VOLUME  and  nbd+unix:///VOLUME?socket={}",
        args.nbd_listen,
        socket.display()
    );
    println!(
        "  metrics   http://{}/metrics  http://{}/metrics",
        args.listen, args.blockd_http_listen
    );
    if volumes.is_empty() {
        println!("No volumes yet. Create one:\n  fabctl volume create vm1 --size 10G");
    } else {
        println!("Volumes:");
        for v in &volumes {
            println!("  {}  ({} bytes)", v.name, v.size);
        }
    }
    let example = volumes.first().map(|v| v.name.as_str()).unwrap_or("vm1");
    println!("Boot a VM with it as its disk:");
    println!("  qemu-system-x86_64 -m 1G -drive file=nbd+unix:///{example}?socket={},format=raw,if=virtio,cache=none ...", socket.display());
    println!("Ctrl-C stops everything.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let failure = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        r = &mut manager => Some(format!("volume-mgr stopped: {:?}", r)),
        r = &mut blockd => Some(format!("blockd stopped: {:?}", r)),
    };
    eprintln!("stopping...");
    let _ = bd_stop_tx.send(());
    if !blockd.is_finished() {
        match tokio::time::timeout(Duration::from_secs(20), &mut blockd).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("fabctl: blockd: {e}"),
            Ok(Err(e)) => eprintln!("fabctl: blockd: {e}"),
            Err(_) => eprintln!("fabctl: blockd did not stop within 20 s"),
        }
    }
    let _ = mgr_stop_tx.send(());
    if !manager.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut manager).await;
    }
    match failure {
        None => {
            eprintln!("stopped.");
            Ok(())
        }
        Some(f) => bail!(f),
    }
}
