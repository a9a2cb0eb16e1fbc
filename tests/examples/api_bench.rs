//! api_bench: control-plane API benchmark of volume-mgr, embedded store (redb) vs etcd (a real
//! 3-member cluster on loopback), issue 8 "Speed". Every run starts a fresh release
//! `volume-mgr` (`--default-replicas 1`, one node registered with a huge disk) on a fresh store
//! and measures, through the real client library and the real CLI:
//!
//! - create: `--volumes` volumes of 4 MiB by `--clients` concurrent clients (creates/s, p50/p99),
//!   then `--ports` tap ports on one network;
//! - get: `--gets` random `GET /v1/volumes/{name}` by the same clients (req/s, p50/p99);
//! - list: `GET /v1/volumes` `--lists` times (p50/p99, size) and the wall time of
//!   `fabctl -o json volume ls` and `fabctl volume ls` as processes (median of `--cli-runs`);
//! - watch delivery: a writer creates volumes one at a time at `--watch-rate`/s for
//!   `--watch-secs` while a watcher long-polls `GET /v1/watch?kinds=volume&since=R`, resuming
//!   from each answer's revision; latency = when the watcher had the event − when the create was
//!   acknowledged to the writer (one process, monotonic clock). Then the same through the old
//!   whole-list long-poll `GET /v1/volumes?after_revision=R`.
//!
//! The CPU time of volume-mgr (and of the etcd members) per phase comes from /proc. Runs
//! alternate between the stores (the order rotating), so both see the same machine noise; the
//! markdown report (medians, ratios, run-by-run values) goes to standard output, progress to
//! standard error.
//!
//! ```sh
//! cargo build --release -p volume-mgr -p tools
//! cargo run --release -p fabric-tests --example api_bench -- --runs 3
//! ```
//!
//! `--help` lists the settings. Ctrl-C / SIGTERM kill the started processes and remove the temp
//! dirs.

use fabric_tests::etcd::EtcdCluster;
use fabric_tests::{free_port, Proc};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volume_mgr::api;
use volume_mgr::client::{Client, ClientError};

type Res<T> = Result<T, String>;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const HELP: &str = "\
api_bench: volume-mgr API benchmark, embedded store vs 3-member etcd

  --stores LIST       stores to compare, comma-separated (embedded,etcd)
  --runs N            runs per store; medians are reported (3)
  --volumes N         volumes created per run (10000)
  --ports N           ports created per run, on one network (1000)
  --clients N         concurrent clients for creates and gets (4)
  --gets N            random GETs per run (5000)
  --lists N           GET /v1/volumes per run (20)
  --cli-runs N        runs of each fabctl command per run (5)
  --watch-rate R      creates per second during the watch phases (20)
  --watch-secs S      length of each watch phase (10)
  --bin-dir DIR       where volume-mgr and fabctl are (the directory above this example's)
  --embedded-dir DIR  parent of the embedded store's temp data dir (/dev/shm, as etcd's)
";

struct Opts {
    stores: Vec<String>,
    runs: usize,
    volumes: usize,
    ports: usize,
    clients: usize,
    gets: usize,
    lists: usize,
    cli_runs: usize,
    watch_rate: f64,
    watch_secs: f64,
    bin_dir: PathBuf,
    embedded_dir: PathBuf,
}

fn parse_opts() -> Res<Opts> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let default_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target/release"));
    let mut o = Opts {
        stores: vec!["embedded".into(), "etcd".into()],
        runs: 3,
        volumes: 10_000,
        ports: 1_000,
        clients: 4,
        gets: 5_000,
        lists: 20,
        cli_runs: 5,
        watch_rate: 20.0,
        watch_secs: 10.0,
        bin_dir: default_bin,
        embedded_dir: if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        },
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let val = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value (see --help)"))?;
        let num = |v: &str| -> Res<usize> {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag}: '{v}' is not a positive integer"))
        };
        let real = |v: &str| -> Res<f64> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n > 0.0)
                .ok_or_else(|| format!("{flag}: '{v}' is not a positive number"))
        };
        match flag.as_str() {
            "--stores" => {
                o.stores = val.split(',').map(str::to_string).collect();
                if let Some(s) = o.stores.iter().find(|s| *s != "embedded" && *s != "etcd") {
                    return Err(format!("--stores: unknown store '{s}' (embedded, etcd)"));
                }
            }
            "--runs" => o.runs = num(&val)?,
            "--volumes" => o.volumes = num(&val)?,
            "--ports" => o.ports = num(&val)?,
            "--clients" => o.clients = num(&val)?,
            "--gets" => o.gets = num(&val)?,
            "--lists" => o.lists = num(&val)?,
            "--cli-runs" => o.cli_runs = num(&val)?,
            "--watch-rate" => o.watch_rate = real(&val)?,
            "--watch-secs" => o.watch_secs = real(&val)?,
            "--bin-dir" => o.bin_dir = PathBuf::from(val),
            "--embedded-dir" => o.embedded_dir = PathBuf::from(val),
            _ => return Err(format!("unknown flag {flag} (see --help)")),
        }
    }
    if o.ports > 4000 {
        return Err("--ports: at most 4000 (the network is a /20)".into());
    }
    for b in ["volume-mgr", "fabctl"] {
        if !o.bin_dir.join(b).is_file() {
            return Err(format!(
                "{} not found: build it (cargo build --release -p volume-mgr -p tools) or give --bin-dir",
                o.bin_dir.join(b).display()
            ));
        }
    }
    Ok(o)
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("api_bench: {e}");
            std::process::exit(2);
        }
    };
    volume_mgr::tls::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.spawn(on_signal());
    let code = match run_all(&rt, &opts) {
        Ok(report) => {
            print!("{report}");
            0
        }
        Err(e) => {
            eprintln!("api_bench: {e}");
            if INTERRUPTED.load(Ordering::SeqCst) {
                130
            } else {
                1
            }
        }
    };
    drop(rt);
    std::process::exit(code);
}

/// SIGINT/SIGTERM: kill every child process (group), so that the phase under way fails, the
/// run's guards drop (temp dirs go) and main exits.
async fn on_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("api_bench: interrupted, stopping the started processes");
        for (pid, _) in children() {
            let pgid = pid as libc::pid_t;
            // SAFETY: kill(2) and getpgid(2) take no pointers; `pid` is a child of this process
            // (its parent field in /proc is us), and a negative pid names the process group it
            // leads (Proc starts every daemon in its own group).
            unsafe {
                if libc::getpgid(pgid) == pgid {
                    libc::kill(-pgid, libc::SIGKILL);
                } else {
                    libc::kill(pgid, libc::SIGKILL);
                }
            }
        }
    }
}

/// (pid, comm) of this process's children, from /proc.
fn children() -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((comm, ppid, _)) = proc_stat(pid) {
            if ppid == me {
                out.push((pid, comm));
            }
        }
    }
    out
}

/// (comm, ppid, utime + stime in ticks) of `pid`.
fn proc_stat(pid: u32) -> Option<(String, u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // After "pid (comm) ": state ppid pgrp ... utime is field 14 of stat, index 11 here.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((comm, ppid, ut + st))
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf(3) takes no pointers and only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds used so far by volume-mgr (`mgr`) and by all etcd members (children named etcd).
fn cpu(mgr: u32) -> (f64, f64) {
    let tck = clk_tck();
    let m = proc_stat(mgr).map(|s| s.2).unwrap_or(0) as f64 / tck;
    let e: u64 = children()
        .iter()
        .filter(|(_, c)| c == "etcd")
        .filter_map(|(p, _)| proc_stat(*p).map(|s| s.2))
        .sum();
    (m, e as f64 / tck)
}

/// One running manager on a fresh store; everything goes on drop (manager, etcd, temp dirs).
struct Setup {
    mgr: Proc,
    addr: String,
    url: String,
    _etcd: Option<EtcdCluster>,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start(opts: &Opts, store: &str) -> Res<Setup> {
        let etcd = (store == "etcd").then(|| EtcdCluster::start(3));
        let dir = tempfile::Builder::new()
            .prefix("fabric-apibench-")
            .tempdir_in(&opts.embedded_dir)
            .map_err(|e| format!("temp dir in {}: {e}", opts.embedded_dir.display()))?;
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("volume-mgr.log"))
            .map_err(|e| format!("log file: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut cmd = Command::new(opts.bin_dir.join("volume-mgr"));
        cmd.args(["--listen", &addr, "--default-replicas", "1"])
            .stdout(log)
            .stderr(log2);
        match &etcd {
            Some(e) => {
                cmd.args([
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    &e.endpoints().join(","),
                ])
                .args(["--etcd-prefix", "/apibench/"]);
            }
            None => {
                cmd.arg("--data-dir").arg(dir.path().join("data"));
            }
        }
        let mut mgr = Proc::spawn("volume-mgr", &mut cmd);
        let t = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(&addr, "/healthz", Duration::from_secs(2)) {
                break;
            }
            if let Some(st) = mgr.try_wait() {
                return Err(format!(
                    "volume-mgr exited ({st}):\n{}",
                    std::fs::read_to_string(dir.path().join("volume-mgr.log")).unwrap_or_default()
                ));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err("volume-mgr: no /healthz after 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = format!("http://{addr}");
        Ok(Setup {
            mgr,
            addr,
            url,
            _etcd: etcd,
            dir,
        })
    }
}

/// A minimal HTTP/1.1 GET on a new connection: (status, body), chunked bodies decoded.
fn http_get(addr: &str, path: &str, timeout: Duration) -> Res<(u16, Vec<u8>)> {
    let err = |e: std::io::Error| format!("GET http://{addr}{path}: {e}");
    let mut s = std::net::TcpStream::connect(addr).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(err)?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).map_err(err)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line"))?;
    let body = buf[end + 4..].to_vec();
    if !head.contains("transfer-encoding: chunked") {
        return Ok((status, body));
    }
    let mut out = vec![];
    let mut rest = &body[..];
    loop {
        let nl = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| format!("GET {path}: bad chunk"))?;
        let size_s = String::from_utf8_lossy(&rest[..nl]);
        let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("GET {path}: bad chunk size"))?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size + 2 {
            return Err(format!("GET {path}: truncated chunk"));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Nearest-rank percentile of an ascending slice (0 when empty).
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

type Metrics = HashMap<&'static str, f64>;

/// Retries a create on 409 (a concurrent change): returns (latency of the successful attempt
/// including retries, retries).
async fn create_retrying<F, Fut, T>(mut f: F) -> Res<(f64, u32)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let t = Instant::now();
    let mut retries = 0;
    loop {
        match f().await {
            Ok(_) => return Ok((ms(t.elapsed()), retries)),
            Err(ClientError::Api { status: 409, .. }) if retries < 20 => retries += 1,
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn vol(name: String) -> api::CreateVolume {
    api::CreateVolume {
        name,
        size: 4 << 20,
        replicas: None,
        min_replicas: None,
    }
}

/// Runs `n` operations `op(i)` split over `clients` concurrent tasks: (wall seconds, sorted
/// latencies in ms, retries).
async fn concurrent<F, Fut>(n: usize, clients: usize, op: F) -> Res<(f64, Vec<f64>, u32)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Res<(f64, u32)>> + Send,
{
    let t = Instant::now();
    let mut tasks = vec![];
    for k in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            let mut retries = 0;
            for i in (k..n).step_by(clients) {
                let (l, r) = op(i).await?;
                lat.push(l);
                retries += r;
            }
            Ok::<_, String>((lat, retries))
        }));
    }
    let mut all = vec![];
    let mut retries = 0;
    for t in tasks {
        let (l, r) = t.await.map_err(|e| format!("task: {e}"))??;
        all.extend(l);
        retries += r;
    }
    Ok((t.elapsed().as_secs_f64(), sorted(all), retries))
}

/// Delivery latencies (ms, received − acknowledged) of the writer's names.
fn delivery(acked: &HashMap<String, Instant>, got: &HashMap<String, Instant>) -> Vec<f64> {
    sorted(
        acked
            .iter()
            .filter_map(|(n, a)| {
                got.get(n).map(|g| {
                    if *g >= *a {
                        ms(g.duration_since(*a))
                    } else {
                        -ms(a.duration_since(*g))
                    }
                })
            })
            .collect(),
    )
}

/// Creates `count` volumes named `{prefix}NNNN` one at a time at `rate`/s: name → ack time.
async fn writer(
    c: &Client,
    prefix: &str,
    count: usize,
    rate: f64,
) -> Res<HashMap<String, Instant>> {
    let start = tokio::time::Instant::now();
    let mut acked = HashMap::new();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let name = format!("{prefix}{i:04}");
        c.create_volume(&vol(name.clone()))
            .await
            .map_err(|e| format!("create {name}: {e}"))?;
        acked.insert(name, Instant::now());
    }
    Ok(acked)
}

/// The benchmark node's one disk: 1 PiB, so creates never run out of capacity.
fn disks() -> Vec<api::DiskSpec> {
    vec![api::DiskSpec {
        path: "/bench/disk0".into(),
        capacity: 1 << 50,
        used: 0,
    }]
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn measure(opts: &Opts, s: &Setup) -> Res<Metrics> {
    let mut m = Metrics::new();
    let c = Client::new(vec![s.url.clone()]);
    c.register_node(
        "n1",
        &api::RegisterNode {
            address: "127.0.0.1:7800".into(),
            nbd_address: "127.0.0.1:10809".into(),
            nbd_socket: None,
            zone: None,
            disks: disks(),
        },
    )
    .await
    .map_err(|e| format!("register node: {e}"))?;
    // The node heartbeats every second, as blockd does, so it stays up (--down-after 5 s).
    let hb = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = c.heartbeat("n1", &api::Heartbeat { disks: disks() }).await;
            }
        })
    };
    let _hb = AbortOnDrop(hb);
    let pid = s.mgr.id();
    let phase_cpu = |m: &mut Metrics, key_m: &'static str, key_e: &'static str, c0: (f64, f64)| {
        let c1 = cpu(pid);
        m.insert(key_m, c1.0 - c0.0);
        m.insert(key_e, c1.1 - c0.1);
    };

    // Creates: volumes.
    eprintln!("  create {} volumes", opts.volumes);
    let c0 = cpu(pid);
    let cc = c.clone();
    let (wall, lat, retries) = concurrent(opts.volumes, opts.clients, move |i| {
        let c = cc.clone();
        async move {
            create_retrying(|| {
                let c = c.clone();
                async move { c.create_volume(&vol(format!("v{i:05}"))).await }
            })
            .await
        }
    })
    .await
    .map_err(|e| format!("volume creates: {e}"))?;
    phase_cpu(&mut m, "cpu_mgr_create_vol", "cpu_etcd_create_vol", c0);
    m.insert("create_vol_rate", opts.volumes as f64 / wall);
    m.insert("create_vol_p50", pct(&lat, 0.5));
    m.insert("create_vol_p99", pct(&lat, 0.99));
    m.insert("create_vol_retries", retries as f64);
    eprintln!(
        "    {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
        opts.volumes as f64 / wall,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );

    // Creates: ports on one network.
    eprintln!("  create {} ports", opts.ports);
    c.create_network(&api::CreateNetwork {
        name: "bench".into(),
        vni: 4242,
        subnet: "10.77.0.0/20".into(),
        mtu: None,
        gateway: None,
        dns: vec![],
    })
    .await
    .map_err(|e| format!("create network: {e}"))?;
    let c0 = cpu(pid);
    let cc = c.clone();
    let (wall, lat, retries) = concurrent(opts.ports, opts.clients, move |i| {
        let c = cc.clone();
        async move {
            create_retrying(|| {
                let c = c.clone();
                async move {
                    c.create_port(&api::CreatePort {
                        name: format!("p{i:04}"),
                        network: "bench".into(),
                        node: "n1".into(),
                        kind: api::PortKind::Tap,
                        mac: None,
                        ip: None,
                        netns: None,
                        ifname: None,
                        vip: None,
                    })
                    .await
                }
            })
            .await
        }
    })
    .await
    .map_err(|e| format!("port creates: {e}"))?;
    phase_cpu(&mut m, "cpu_mgr_create_port", "cpu_etcd_create_port", c0);
    m.insert("create_port_rate", opts.ports as f64 / wall);
    m.insert("create_port_p50", pct(&lat, 0.5));
    m.insert("create_port_p99", pct(&lat, 0.99));
    m.insert("create_port_retries", retries as f64);
    eprintln!(
        "    {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
        opts.ports as f64 / wall,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );

    // Gets: random names (xorshift, fixed seed per client slot).
    eprintln!("  {} random gets", opts.gets);
    let c0 = cpu(pid);
    let cc = c.clone();
    let nvol = opts.volumes;
    let (wall, lat, _) = concurrent(opts.gets, opts.clients, move |i| {
        let c = cc.clone();
        async move {
            let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let k = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as usize % nvol;
            let name = format!("v{k:05}");
            let t = Instant::now();
            let v = c
                .get_volume(&name)
                .await
                .map_err(|e| format!("get {name}: {e}"))?;
            if v.name != name {
                return Err(format!("get {name} answered {}", v.name));
            }
            Ok((ms(t.elapsed()), 0))
        }
    })
    .await?;
    phase_cpu(&mut m, "cpu_mgr_get", "cpu_etcd_get", c0);
    m.insert("get_rate", opts.gets as f64 / wall);
    m.insert("get_p50", pct(&lat, 0.5));
    m.insert("get_p99", pct(&lat, 0.99));

    // Lists through the client library.
    eprintln!("  {} lists", opts.lists);
    let c0 = cpu(pid);
    let mut lat = vec![];
    for _ in 0..opts.lists {
        let t = Instant::now();
        let l = c
            .list_volumes()
            .await
            .map_err(|e| format!("list volumes: {e}"))?;
        lat.push(ms(t.elapsed()));
        if l.items.len() != opts.volumes {
            return Err(format!(
                "list has {} volumes, {} were created",
                l.items.len(),
                opts.volumes
            ));
        }
    }
    phase_cpu(&mut m, "cpu_mgr_list", "cpu_etcd_list", c0);
    let lat = sorted(lat);
    m.insert("list_p50", pct(&lat, 0.5));
    m.insert("list_p99", pct(&lat, 0.99));
    let (st, body) = http_get(&s.addr, "/v1/volumes", Duration::from_secs(30))?;
    if st != 200 {
        return Err(format!("GET /v1/volumes: HTTP {st}"));
    }
    m.insert("list_mb", body.len() as f64 / 1e6);

    // The real CLI, as processes.
    eprintln!("  fabctl volume ls x {} (json, table)", opts.cli_runs);
    let fabctl = opts.bin_dir.join("fabctl");
    for (key, json) in [("cli_json", true), ("cli_table", false)] {
        let mut wall = vec![];
        for _ in 0..opts.cli_runs {
            let mut cmd = Command::new(&fabctl);
            cmd.args(["--manager", &s.url]);
            if json {
                cmd.args(["-o", "json"]);
            }
            cmd.args(["volume", "ls"])
                .env_remove("FABRIC_TOKEN")
                .env_remove("FABRIC_CA")
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .stdout(Stdio::piped());
            let t = Instant::now();
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .map_err(|e| format!("task: {e}"))?
                .map_err(|e| format!("{}: {e}", fabctl.display()))?;
            wall.push(ms(t.elapsed()));
            if !out.status.success() {
                return Err(format!(
                    "fabctl volume ls: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let n = if json {
                serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                    .map_err(|e| format!("fabctl -o json volume ls: not a JSON array: {e}"))?
                    .len()
            } else {
                out.stdout.iter().filter(|b| **b == b'\n').count() - 1
            };
            if n != opts.volumes {
                return Err(format!(
                    "fabctl volume ls ({}) showed {n} volumes, not {}",
                    if json { "json" } else { "table" },
                    opts.volumes
                ));
            }
        }
        m.insert(key, pct(&sorted(wall), 0.5));
    }

    let count = (opts.watch_rate * opts.watch_secs).round().max(1.0) as usize;

    // Watch delivery through GET /v1/watch.
    eprintln!(
        "  watch: {count} creates at {}/s, watcher on /v1/watch",
        opts.watch_rate
    );
    let since = c
        .list_volumes()
        .await
        .map_err(|e| format!("list: {e}"))?
        .revision;
    let stop = Arc::new(AtomicBool::new(false));
    let got: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let watcher = {
        let w = Client::new(vec![s.url.clone()]);
        let (stop, got) = (stop.clone(), got.clone());
        tokio::spawn(async move {
            let mut since = since;
            let mut answers = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let ev = w
                    .watch("volume", since, Duration::from_millis(500))
                    .await
                    .map_err(|e| format!("watch since {since}: {e}"))?;
                let now = Instant::now();
                answers += 1;
                let mut g = got.lock().unwrap();
                for e in &ev.events {
                    if e.kind == "volume" && !e.deleted {
                        g.entry(e.name.clone()).or_insert(now);
                    }
                }
                since = ev.revision;
            }
            Ok::<u64, String>(answers)
        })
    };
    let c0 = cpu(pid);
    let acked = writer(&c, "w", count, opts.watch_rate).await?;
    let t = Instant::now();
    while got.lock().unwrap().len() < count && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let answers = watcher.await.map_err(|e| format!("task: {e}"))??;
    phase_cpu(&mut m, "cpu_mgr_watch", "cpu_etcd_watch", c0);
    let lat = delivery(&acked, &got.lock().unwrap());
    m.insert("watch_delivered", lat.len() as f64 / count as f64 * 100.0);
    m.insert("watch_p50", pct(&lat, 0.5));
    m.insert("watch_p99", pct(&lat, 0.99));
    m.insert("watch_max", pct(&lat, 1.0));
    m.insert("watch_answers", answers as f64);
    eprintln!(
        "    delivered {}/{count}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );

    // The same through the old whole-list long-poll.
    eprintln!("  watch: {count} creates, watcher on GET /v1/volumes?after_revision (whole list)");
    let since = c
        .list_volumes()
        .await
        .map_err(|e| format!("list: {e}"))?
        .revision;
    let stop = Arc::new(AtomicBool::new(false));
    let got: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let watcher = {
        let (stop, got, addr) = (stop.clone(), got.clone(), s.addr.clone());
        std::thread::spawn(move || {
            let mut since = since;
            let (mut answers, mut bytes) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let path = format!("/v1/volumes?after_revision={since}&timeout_ms=500");
                let (st, body) = http_get(&addr, &path, Duration::from_secs(30))?;
                if st != 200 {
                    return Err(format!("GET {path}: HTTP {st}"));
                }
                let l: api::List<api::Volume> =
                    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))?;
                let now = Instant::now();
                answers += 1;
                bytes += body.len() as u64;
                let mut g = got.lock().unwrap();
                for v in &l.items {
                    if v.name.starts_with('x') {
                        g.entry(v.name.clone()).or_insert(now);
                    }
                }
                since = l.revision;
            }
            Ok::<(u64, u64), String>((answers, bytes))
        })
    };
    let c0 = cpu(pid);
    let acked = writer(&c, "x", count, opts.watch_rate).await;
    let t = Instant::now();
    while acked.is_ok()
        && got.lock().unwrap().len() < count
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (answers, bytes) = tokio::task::spawn_blocking(move || watcher.join())
        .await
        .map_err(|e| format!("task: {e}"))?
        .map_err(|_| "whole-list watcher panicked".to_string())??;
    let acked = acked?;
    phase_cpu(&mut m, "cpu_mgr_oldwatch", "cpu_etcd_oldwatch", c0);
    let lat = delivery(&acked, &got.lock().unwrap());
    m.insert(
        "oldwatch_delivered",
        lat.len() as f64 / count as f64 * 100.0,
    );
    m.insert("oldwatch_p50", pct(&lat, 0.5));
    m.insert("oldwatch_p99", pct(&lat, 0.99));
    m.insert("oldwatch_max", pct(&lat, 1.0));
    m.insert("oldwatch_answers", answers as f64);
    m.insert("oldwatch_mb", bytes as f64 / 1e6);
    eprintln!(
        "    delivered {}/{count}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({answers} answers, {:.0} MB)",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        bytes as f64 / 1e6
    );
    Ok(m)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// (key, label, decimals, target: Some((limit, "under"))).
const ROWS: &[(&str, &str, usize, Option<f64>)] = &[
    ("create_vol_rate", "volume create, creates/s", 0, None),
    ("create_vol_p50", "volume create p50, ms", 1, None),
    ("create_vol_p99", "volume create p99, ms", 1, None),
    ("create_port_rate", "port create, creates/s", 0, None),
    ("create_port_p50", "port create p50, ms", 1, None),
    ("create_port_p99", "port create p99, ms", 1, None),
    ("get_rate", "volume get, req/s", 0, None),
    ("get_p50", "volume get p50, ms", 2, None),
    ("get_p99", "volume get p99, ms", 2, None),
    ("list_p50", "GET /v1/volumes (client lib) p50, ms", 1, None),
    ("list_p99", "GET /v1/volumes (client lib) p99, ms", 1, None),
    ("list_mb", "GET /v1/volumes body, MB", 2, None),
    ("cli_json", "`fabctl -o json volume ls`, ms", 0, Some(300.0)),
    ("cli_table", "`fabctl volume ls`, ms", 0, Some(300.0)),
    ("watch_p50", "watch delivery (/v1/watch) p50, ms", 1, None),
    (
        "watch_p99",
        "watch delivery (/v1/watch) p99, ms",
        1,
        Some(50.0),
    ),
    ("watch_max", "watch delivery (/v1/watch) max, ms", 1, None),
    ("watch_delivered", "watch: events delivered, %", 0, None),
    (
        "oldwatch_p50",
        "whole-list long-poll delivery p50, ms",
        1,
        None,
    ),
    (
        "oldwatch_p99",
        "whole-list long-poll delivery p99, ms",
        1,
        None,
    ),
    (
        "oldwatch_max",
        "whole-list long-poll delivery max, ms",
        1,
        None,
    ),
    (
        "oldwatch_delivered",
        "whole-list: events delivered, %",
        0,
        None,
    ),
    (
        "oldwatch_answers",
        "whole-list: answers in the phase",
        0,
        None,
    ),
    ("oldwatch_mb", "whole-list: MB sent to the watcher", 0, None),
    (
        "cpu_mgr_create_vol",
        "CPU s volume-mgr, volume creates",
        2,
        None,
    ),
    (
        "cpu_etcd_create_vol",
        "CPU s etcd (3 members), volume creates",
        2,
        None,
    ),
    (
        "cpu_mgr_create_port",
        "CPU s volume-mgr, port creates",
        2,
        None,
    ),
    ("cpu_etcd_create_port", "CPU s etcd, port creates", 2, None),
    ("cpu_mgr_get", "CPU s volume-mgr, gets", 2, None),
    ("cpu_mgr_list", "CPU s volume-mgr, lists", 2, None),
    (
        "cpu_mgr_watch",
        "CPU s volume-mgr, /v1/watch phase",
        2,
        None,
    ),
    (
        "cpu_mgr_oldwatch",
        "CPU s volume-mgr, whole-list phase",
        2,
        None,
    ),
    ("cpu_etcd_watch", "CPU s etcd, /v1/watch phase", 2, None),
    (
        "create_vol_retries",
        "volume creates retried (409)",
        0,
        None,
    ),
    ("create_port_retries", "port creates retried (409)", 0, None),
];

fn median(v: &[f64]) -> f64 {
    let s = sorted(v.to_vec());
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn run_all(rt: &tokio::runtime::Runtime, opts: &Opts) -> Res<String> {
    let mut results: HashMap<String, Vec<Metrics>> = HashMap::new();
    let mut loads = vec![];
    let t_all = Instant::now();
    for run in 0..opts.runs {
        let mut order = opts.stores.clone();
        let n = order.len();
        order.rotate_left(run % n);
        for store in order {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err("interrupted".into());
            }
            let load = loadavg();
            eprintln!(
                "run {}/{} {store} (load {load}, {:.0} s so far)",
                run + 1,
                opts.runs,
                t_all.elapsed().as_secs_f64()
            );
            let t = Instant::now();
            let setup = Setup::start(opts, &store)?;
            let m = rt.block_on(measure(opts, &setup)).map_err(|e| {
                format!(
                    "run {} {store}: {e} (volume-mgr log: {})",
                    run + 1,
                    setup.dir.path().join("volume-mgr.log").display()
                )
            });
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    let log = std::fs::read_to_string(setup.dir.path().join("volume-mgr.log"))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(10).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    return Err(format!("{e}\nvolume-mgr log tail:\n{}", tail.join("\n")));
                }
            };
            drop(setup);
            loads.push(format!(
                "run {} {store}: load {load} at start, {:.0} s",
                run + 1,
                t.elapsed().as_secs_f64()
            ));
            results.entry(store).or_default().push(m);
        }
    }
    Ok(report(opts, &results, &loads, t_all.elapsed()))
}

fn report(
    opts: &Opts,
    results: &HashMap<String, Vec<Metrics>>,
    loads: &[String],
    total: Duration,
) -> String {
    let mut o = String::new();
    let stores = &opts.stores;
    let cell = |store: &str, key: &str, dec: usize| -> (f64, String) {
        let v: Vec<f64> = results[store]
            .iter()
            .filter_map(|m| m.get(key).copied())
            .collect();
        let med = median(&v);
        (med, format!("{med:.dec$}"))
    };
    o.push_str(&format!(
        "Medians of {} runs per store; {} volumes (4 MiB, 1 replica) and {} ports by {} concurrent \
         clients, {} random gets, {} lists, fabctl median of {}, watch phases {} creates at {}/s.\n\n",
        opts.runs,
        opts.volumes,
        opts.ports,
        opts.clients,
        opts.gets,
        opts.lists,
        opts.cli_runs,
        (opts.watch_rate * opts.watch_secs).round(),
        opts.watch_rate
    ));
    o.push_str("| measure |");
    for s in stores {
        o.push_str(&format!(" {s} |"));
    }
    let ratio = stores.len() == 2;
    if ratio {
        o.push_str(&format!(" {} / {} |", stores[1], stores[0]));
    }
    o.push_str(" target |\n|---|");
    for _ in stores {
        o.push_str("---|");
    }
    if ratio {
        o.push_str("---|");
    }
    o.push_str("---|\n");
    for (key, label, dec, target) in ROWS {
        let vals: Vec<(f64, String)> = stores.iter().map(|s| cell(s, key, *dec)).collect();
        if vals.iter().all(|(v, _)| v.is_nan()) {
            continue;
        }
        o.push_str(&format!("| {label} |"));
        for (_, s) in &vals {
            o.push_str(&format!(" {s} |"));
        }
        if ratio {
            let (a, b) = (vals[0].0, vals[1].0);
            if a > 0.0 && b.is_finite() && !key.ends_with("delivered") {
                o.push_str(&format!(" {:.2}x |", b / a));
            } else {
                o.push_str(" |");
            }
        }
        match target {
            Some(limit) => {
                let verdicts: Vec<String> = stores
                    .iter()
                    .zip(&vals)
                    .map(|(s, (v, _))| {
                        format!("{s} {}", if *v < *limit { "met" } else { "**not met**" })
                    })
                    .collect();
                o.push_str(&format!(" < {limit:.0}: {} |\n", verdicts.join(", ")));
            }
            None => o.push_str(" |\n"),
        }
    }
    o.push_str("\nRun by run (run order as run):\n\n| measure |");
    for s in stores {
        o.push_str(&format!(" {s} |"));
    }
    o.push_str("\n|---|");
    for _ in stores {
        o.push_str("---|");
    }
    o.push('\n');
    for (key, label, dec, _) in ROWS {
        o.push_str(&format!("| {label} |"));
        for s in stores {
            let v: Vec<String> = results[s]
                .iter()
                .map(|m| {
                    m.get(key)
                        .map(|v| format!("{v:.dec$}"))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            o.push_str(&format!(" {} |", v.join(" / ")));
        }
        o.push('\n');
    }
    o.push_str(&format!(
        "\nLoad and wall time per run ({:.0} s in all):\n\n",
        total.as_secs_f64()
    ));
    for l in loads {
        o.push_str(&format!("- {l}\n"));
    }
    o
}
