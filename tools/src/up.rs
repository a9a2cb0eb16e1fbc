//! `fabctl up`: the single-host all-in-one. Runs volume-mgr (embedded store), blockd (one
//! file-backed disk), vswitch and lb-vip in this process as one supervised group, prints how
//! to use them, and stops all cleanly on Ctrl-C / SIGTERM. A second `up` on the same data
//! directory finds its volumes again.
//!
//! Failure policy: volume-mgr, blockd or lb-vip failing (at start or later) stops everything
//! with a non-zero exit. vswitch failing (e.g. not root: it cannot create taps or open
//! AF_PACKET sockets) is a `WARNING` line on stderr and the rest keeps running: disks work
//! without networks.

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
    /// vswitch's underlay (VTEP) address: an IPv4 address of one of this host's interfaces.
    /// Loopback (the default) serves the VMs of this host; a real interface's address lets
    /// other hosts join the same networks.
    #[arg(long, default_value = "127.0.0.1")]
    pub underlay_ip: String,
    /// vswitch's VXLAN UDP port.
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// vswitch /metrics and /healthz address ("none" to disable).
    #[arg(long, default_value = "127.0.0.1:7900")]
    pub vswitch_http_listen: String,
    /// lb-vip /metrics and /healthz address ("none" to disable).
    #[arg(long, default_value = "127.0.0.1:7950")]
    pub lbvip_http_listen: String,
    /// Do not run vswitch (no overlay networks on this host).
    #[arg(long)]
    pub no_vswitch: bool,
}

/// Waits until something accepts TCP connections on `addr` (a daemon's HTTP listener), or
/// `task` ends, or `limit` passes. True when it accepts.
async fn listening<T>(addr: &str, task: &tokio::task::JoinHandle<T>, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit && !task.is_finished() {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn vswitch_warning(why: &str) {
    eprintln!(
        "fabctl up: WARNING: vswitch is not running ({why}); overlay networks and ports do not \
         work on this host, everything else runs"
    );
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
    // lb-vip's settings are checked before blockd starts: a bad one stops nothing half-way.
    let lcfg = lb_vip::config::FileConfig {
        manager: Some(manager_url.clone()),
        node: Some(node.clone()),
        http_listen: Some(args.lbvip_http_listen.clone()),
        ..Default::default()
    }
    .resolve()
    .map_err(|e| anyhow::anyhow!("lb-vip: {e}"))?;
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
    // lb-vip: fatal if it cannot start.
    let (lb_stop_tx, lb_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut lbvip = tokio::spawn(lb_vip::daemon::run(lcfg, async move {
        let _ = lb_stop_rx.await;
    }));

    // vswitch: a warning if it cannot start; the rest runs.
    let (vs_stop_tx, vs_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut vswitch: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    if args.no_vswitch {
        vswitch_warning("--no-vswitch");
    } else {
        match (vswitch::config::FileConfig {
            manager: Some(manager_url.clone()),
            node: Some(node.clone()),
            underlay_ip: Some(args.underlay_ip.clone()),
            vxlan_port: Some(args.vxlan_port),
            http_listen: Some(args.vswitch_http_listen.clone()),
            ..Default::default()
        })
        .resolve()
        {
            Ok(vcfg) => {
                vswitch = Some(tokio::spawn(vswitch::daemon::run(vcfg, async move {
                    let _ = vs_stop_rx.await;
                })))
            }
            Err(e) => vswitch_warning(&e),
        }
    }
    // A daemon that cannot bind its listeners fails within moments: give both a moment, so
    // an occupied address is not mistaken for "it listens".
    tokio::time::sleep(Duration::from_millis(300)).await;
    let limit = Duration::from_secs(10);
    if args.lbvip_http_listen != "none"
        && !listening(&args.lbvip_http_listen, &lbvip, limit).await
        && !lbvip.is_finished()
    {
        lbvip.abort();
        bail!(
            "lb-vip did not listen on {} within 10 s",
            args.lbvip_http_listen
        );
    }
    if lbvip.is_finished() {
        let why = match (&mut lbvip).await {
            Ok(Ok(())) => "stopped".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => e.to_string(),
        };
        let _ = vs_stop_tx.send(());
        if let Some(vs) = vswitch.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(10), vs).await;
        }
        let _ = bd_stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut blockd).await;
        let _ = mgr_stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut manager).await;
        bail!("lb-vip cannot start: {why}");
    }
    if let Some(vs) = vswitch.as_mut() {
        if args.vswitch_http_listen != "none" {
            listening(&args.vswitch_http_listen, vs, limit).await;
        }
        if vs.is_finished() {
            match vs.await {
                Ok(Ok(())) => vswitch_warning("it stopped"),
                Ok(Err(e)) => vswitch_warning(&format!("{e:#}")),
                Err(e) => vswitch_warning(&e.to_string()),
            }
            vswitch = None;
        }
    }

    // A running vswitch that cannot register (e.g. the manager refuses its underlay) serves
    // nothing: say so.
    if vswitch.is_some() {
        let start = Instant::now();
        let mut registered = false;
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(l) = client.list_switches().await {
                if l.items.iter().any(|s| s.node == node) {
                    registered = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !registered {
            eprintln!(
                "fabctl up: WARNING: vswitch runs but has not registered with volume-mgr within \
                 5 s (see its log lines); ports on this host are not served until it does"
            );
        }
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
        "  blockd    node {node}, replicas on {}, metrics http://{}/metrics",
        args.blockd_listen, args.blockd_http_listen
    );
    println!("  manager metrics http://{}/metrics", args.listen);
    match &vswitch {
        Some(_) => println!(
            "  vswitch   underlay {}:{} (VXLAN), metrics http://{}/metrics",
            args.underlay_ip, args.vxlan_port, args.vswitch_http_listen
        ),
        None => println!("  vswitch   NOT RUNNING (see the warning above)"),
    }
    println!(
        "  lb-vip    metrics http://{}/metrics",
        args.lbvip_http_listen
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
    println!("Boot a VM with it as its disk and a NIC on a fabric port:");
    println!("  fabctl net create net1 --vni 100 --subnet 192.0.2.0/24");
    println!("  fabctl port create vm1-eth0 --net net1 --node {node} --kind netdev");
    println!("  qemu-system-x86_64 -enable-kvm -m 1G \\");
    println!(
        "    -drive file=nbd+unix:///{example}?socket={},format=raw,if=virtio,cache=none \\",
        socket.display()
    );
    println!("    -netdev tap,id=n0,ifname=vm1-eth0,script=no,downscript=no \\");
    println!("    -device virtio-net-pci,netdev=n0,mac=MAC_FROM_fabctl_port_show");
    println!("Ctrl-C stops everything.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let failure = loop {
        let vs_done = async {
            match vswitch.as_mut() {
                Some(v) => v.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = term.recv() => break None,
            r = &mut manager => break Some(format!("volume-mgr stopped: {}", outcome(r))),
            r = &mut blockd => break Some(format!("blockd stopped: {}", outcome(r))),
            r = &mut lbvip => break Some(format!("lb-vip stopped: {}", outcome(r))),
            r = vs_done => {
                vswitch_warning(&format!("it stopped: {}", outcome(r)));
                vswitch = None;
            }
        }
    };
    eprintln!("stopping...");
    let _ = lb_stop_tx.send(());
    let _ = vs_stop_tx.send(());
    if !lbvip.is_finished()
        && tokio::time::timeout(Duration::from_secs(10), &mut lbvip)
            .await
            .is_err()
    {
        eprintln!("fabctl: lb-vip did not stop within 10 s");
    }
    if let Some(vs) = vswitch.as_mut() {
        if tokio::time::timeout(Duration::from_secs(10), vs)
            .await
            .is_err()
        {
            eprintln!("fabctl: vswitch did not stop within 10 s");
        }
    }
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

fn outcome<E: std::fmt::Display>(r: Result<Result<(), E>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "exited".into(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => e.to_string(),
    }
}
