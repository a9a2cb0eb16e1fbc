//! lb-vip end-to-end harness: the real `volume-mgr` and `lb-vip` binaries on loopback, VIPs
//! created through the manager's HTTP API, backends that are tiny HTTP servers (a thread per
//! connection) on 127.0.0.x addresses, and a plain `Connection: close` HTTP client. Every
//! test gets its own 127.N.0.0/16 block (`Lb::start(N)`), so tests run in parallel.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cluster::{bin, http_get};
use crate::Proc;

/// The lb-vip binary: `$FABRIC_LBVIP_BIN` or the workspace's.
pub fn lbvip_bin() -> PathBuf {
    match std::env::var_os("FABRIC_LBVIP_BIN") {
        Some(p) => PathBuf::from(p),
        None => bin("lb-vip"),
    }
}

/// A free port on `ip` (bound to port 0, then released).
pub fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// volume-mgr + one lb-vip (node `lb1`), killed on drop.
pub struct Lb {
    dir: tempfile::TempDir,
    /// `127.N.0.1:port`
    pub manager: String,
    /// lb-vip's `/metrics` address.
    pub http: String,
    /// The test's block: `127.N.0.0/16`.
    pub net: u8,
    _mgr: Proc,
    lbvip: Option<Proc>,
}

impl Lb {
    /// Starts both daemons in block `127.net.0.0/16` and waits for their `/healthz`.
    pub fn start(net: u8) -> Lb {
        let dir = tempfile::tempdir().unwrap();
        let ip = format!("127.{net}.0.1");
        let manager = format!("{ip}:{}", free_port_on(&ip));
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let mgr = Proc::spawn(
            "volume-mgr",
            Command::new(bin("volume-mgr"))
                .args(["--listen", &manager])
                .arg("--data-dir")
                .arg(dir.path().join("manager"))
                .env("NO_COLOR", "1")
                .stdout(log("volume-mgr.log"))
                .stderr(log("volume-mgr.log")),
        );
        wait("volume-mgr /healthz", Duration::from_secs(30), || {
            matches!(http_get(&manager, "/healthz"), Some((200, _)))
        });
        let http = format!("{ip}:{}", free_port_on(&ip));
        let lbvip = Proc::spawn(
            "lb-vip",
            Command::new(lbvip_bin())
                .args(["--manager", &format!("http://{manager}")])
                .args(["--node", "lb1", "--http-listen", &http])
                .args(["--connect-timeout", "300ms"])
                .env("NO_COLOR", "1")
                .env(
                    "RUST_LOG",
                    std::env::var("FABRIC_LBVIP_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdout(log("lb-vip.log"))
                .stderr(log("lb-vip.log")),
        );
        let lb = Lb {
            dir,
            manager,
            http,
            net,
            _mgr: mgr,
            lbvip: Some(lbvip),
        };
        wait("lb-vip /healthz", Duration::from_secs(30), || {
            matches!(http_get(&lb.http, "/healthz"), Some((200, _)))
        });
        lb
    }

    /// `127.N.0.host`
    pub fn ip(&self, host: u8) -> String {
        format!("127.{}.0.{host}", self.net)
    }

    /// One API call: (status, JSON body or Null).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect(&self.manager).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.manager,
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (
            code,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn api_ok(&self, method: &str, path: &str, body: Option<&serde_json::Value>) {
        let (code, v) = self.api(method, path, body);
        assert!((200..300).contains(&code), "{method} {path}: {code} {v}");
    }

    /// Creates a VIP: `extra` adds/overrides fields of the create request.
    pub fn create_vip(&self, name: &str, addr: &str, proto: &str, extra: serde_json::Value) {
        let mut req = serde_json::json!({
            "name": name,
            "addr": addr,
            "proto": proto,
            "check": {"kind": "tcp", "interval_ms": 200, "timeout_ms": 150, "rise": 2, "fall": 3},
        });
        if let serde_json::Value::Object(m) = extra {
            for (k, v) in m {
                req[k] = v;
            }
        }
        self.api_ok("POST", "/v1/vips", Some(&req));
    }

    pub fn add_backend(&self, vip: &str, addr: &str, weight: u32) {
        self.api_ok(
            "POST",
            &format!("/v1/vips/{vip}/backends"),
            Some(&serde_json::json!({"addr": addr, "weight": weight})),
        );
    }

    pub fn remove_backend(&self, vip: &str, addr: &str) {
        self.api_ok("DELETE", &format!("/v1/vips/{vip}/backends/{addr}"), None);
    }

    pub fn drain_backend(&self, vip: &str, addr: &str) {
        self.api_ok(
            "POST",
            &format!("/v1/vips/{vip}/backends/{addr}/drain"),
            None,
        );
    }

    /// lb-vip's `/metrics`.
    pub fn metrics(&self) -> String {
        http_get(&self.http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// A backend metric (`lbvip_backend_*{vip,backend}`); None if absent.
    pub fn backend_metric(&self, name: &str, vip: &str, backend: &str) -> Option<f64> {
        let key = format!("{name}{{vip=\"{vip}\",backend=\"{backend}\"}} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&key).and_then(|v| v.trim().parse().ok()))
    }

    /// Waits until lb-vip has applied the backend set: every backend of `serving` is serving,
    /// every one of `not_serving` is not (or absent).
    pub fn wait_backends(&self, vip: &str, serving: &[&str], not_serving: &[&str]) {
        wait(
            "lb-vip to apply the backend set",
            Duration::from_secs(10),
            || {
                serving
                    .iter()
                    .all(|b| self.backend_metric("lbvip_backend_serving", vip, b) == Some(1.0))
                    && not_serving
                        .iter()
                        .all(|b| self.backend_metric("lbvip_backend_serving", vip, b) != Some(1.0))
            },
        );
    }

    /// Both daemons' logs (for failure messages).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in ["volume-mgr.log", "lb-vip.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            s += &format!("--- {n} (last lines) ---\n");
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    /// The lb-vip process is still running.
    pub fn lbvip_alive(&mut self) -> bool {
        self.lbvip.as_mut().is_some_and(|p| p.try_wait().is_none())
    }
}

/// Polls `f` every 20 ms; panics after `timeout`.
pub fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tiny HTTP backend: answers every request with its name as the body, after `hold`
/// ([`start_slow`](Self::start_slow)); `GET /hold/MS` holds MS milliseconds more. Counts the requests it answered and the connections open.
/// Stopping it ([`kill`](Self::kill) or drop) closes the listening socket (connects are then
/// refused); connections in progress still finish.
pub struct Backend {
    pub addr: String,
    pub name: String,
    pub hits: Arc<AtomicU64>,
    pub open: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    pub fn start(ip: &str, name: &str) -> Backend {
        Self::start_slow(ip, name, Duration::ZERO)
    }

    /// A backend that holds every request `hold` before answering.
    pub fn start_slow(ip: &str, name: &str, hold: Duration) -> Backend {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let hits = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (hits, open, stop, name) =
                (hits.clone(), open.clone(), stop.clone(), name.to_string());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    let (hits, open, name) = (hits.clone(), open.clone(), name.clone());
                    open.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        serve_one(s, &name, &hits, hold);
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        Backend {
            addr,
            name: name.to_string(),
            hits,
            open,
            stop,
            thread: Some(thread),
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes the listening socket.
    pub fn kill(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so it sees `stop` and drops the listener.
            let _ = TcpStream::connect_timeout(&self.addr.parse().unwrap(), Duration::from_secs(1));
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve_one(mut s: TcpStream, name: &str, hits: &AtomicU64, hold: Duration) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            return;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    std::thread::sleep(hold);
    if let Some(ms) = path
        .strip_prefix("/hold/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let resp = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    );
    if s.write_all(resp.as_bytes()).is_ok() {
        hits.fetch_add(1, Ordering::SeqCst);
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// One `GET path` through `addr` with `Connection: close`; the body (the backend's name).
pub fn request(addr: &str, path: &str) -> Result<String, String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") && !body.is_empty() => {
            Ok(body.to_string())
        }
        _ => Err(format!("bad response {resp:?}")),
    }
}

/// One request's outcome: (time since the load started, body or error).
pub type Outcome = (Duration, Result<String, String>);

/// Load: `threads` client threads each sending `GET path` through `vip` in a loop until
/// stopped; records (time since start, result) of every request.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
    pub start: Instant,
}

impl Load {
    pub fn start(vip: &str, path: &str, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = (0..threads)
            .map(|_| {
                let (stop, vip, path) = (stop.clone(), vip.to_string(), path.to_string());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let r = request(&vip, &path);
                        out.push((start.elapsed(), r));
                    }
                    out
                })
            })
            .collect();
        Load {
            stop,
            threads,
            start,
        }
    }

    /// Stops the clients; every request's (time since start, result).
    pub fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all: Vec<_> = std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_by_key(|(t, _)| *t);
        all
    }
}

impl Drop for Load {
    /// A test that fails midway stops its clients too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A UDP echo backend that prefixes its answers with its name and `:`.
pub struct UdpEcho {
    pub addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ip: &str, name: &str) -> UdpEcho {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = s.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, name) = (stop.clone(), name.to_string());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let mut out = format!("{name}:").into_bytes();
                        out.extend_from_slice(&buf[..n.min(1024)]);
                        let _ = s.send_to(&out, from);
                    }
                }
            })
        };
        UdpEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
