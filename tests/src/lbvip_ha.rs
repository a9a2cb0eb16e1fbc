//! lb-vip high availability harness: namespace hosts on one bridge (`netns::Net`,
//! 198.18.0.0/24) — volume-mgr on host 0, lb-vip with `--vip-interface eth0` on hosts 1 and 2,
//! HTTP backends on hosts 3 and 4, a client on host 5 — and the helpers to act inside a
//! namespace from the test process: a thread that enters it ([`in_ns`]), requests from a fixed
//! source address and port ([`request_from`]), and which hosts have an address now
//! ([`HaNet::holders_of`]). Processes are killed and namespaces deleted on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::{bin, http_get};
use crate::lbvip::{lbvip_bin, Backend};
use crate::netns::{Host, Net};
use crate::Proc;

/// Host indexes in [`HaNet`].
pub const MANAGER: usize = 0;
pub const LB: [usize; 2] = [1, 2];
pub const BACKENDS: [usize; 2] = [3, 4];
pub const CLIENT: usize = 5;

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it creates live
/// there, also after the thread ends).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) takes a namespace file descriptor that `file` keeps open for the
        // call; CLONE_NEWNET only moves this (new, single-purpose) thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A TCP connection from `src` (address reuse on, so one source port serves again once its
/// previous connection closed) to `dst`, giving up after `timeout`.
pub fn connect_from(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` is a fresh socket nobody else owns; `OwnedFd` closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let (s, d) = (sockaddr_in(src), sockaddr_in(dst));
    // SAFETY: each pointer is to a live local of the size passed with it; `fd` is open.
    unsafe {
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        // Linux bounds a blocking connect(2) by the send timeout.
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        check(libc::bind(
            fd,
            (&s as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))?;
        check(libc::connect(
            fd,
            (&d as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))?;
    }
    Ok(TcpStream::from(owned))
}

/// One `GET /` from `src` to `dst` (`Connection: close`), each step bounded by `timeout`:
/// the body (the backend's name).
pub fn request_from(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    timeout: Duration,
) -> Result<String, String> {
    let mut s = connect_from(src, dst, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read: {e}"))?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") && !body.is_empty() => {
            Ok(body.to_string())
        }
        _ => Err(format!("bad response {resp:?}")),
    }
}

/// The cluster of the HA tests.
pub struct HaNet {
    // Processes first: they die before their namespaces are deleted.
    lbvips: Vec<Option<Proc>>,
    manager: Option<Proc>,
    pub backends: Vec<Backend>,
    pub net: Net,
    dir: tempfile::TempDir,
    /// `198.18.0.1:7700`
    pub manager_addr: String,
    /// lb-vip `/metrics` addresses (inside each lb host).
    pub lb_http: Vec<String>,
}

impl HaNet {
    /// Six hosts, the manager, two lb-vip instances (`lbA`, `lbB`) and two backends (`b1`,
    /// `b2`); waits until each answers.
    pub fn start() -> HaNet {
        crate::require("busybox");
        let net = Net::new(6);
        let dir = tempfile::tempdir().unwrap();
        let mut h = HaNet {
            lbvips: Vec::new(),
            manager: None,
            backends: Vec::new(),
            manager_addr: format!("{}:7700", net.hosts[MANAGER].addr),
            lb_http: Vec::new(),
            net,
            dir,
        };
        let mgr = Proc::spawn(
            "volume-mgr",
            h.host(MANAGER)
                .command(bin("volume-mgr"))
                .args(["--listen", &h.manager_addr])
                .arg("--data-dir")
                .arg(h.dir.path().join("manager"))
                .env("NO_COLOR", "1")
                .stdout(h.log("volume-mgr.log"))
                .stderr(h.log("volume-mgr.log")),
        );
        h.manager = Some(mgr);
        let (ns, addr) = (h.host(CLIENT).ns.clone(), h.manager_addr.clone());
        h.wait("volume-mgr /healthz", Duration::from_secs(30), || {
            let (ns, addr) = (ns.clone(), addr.clone());
            in_ns(&ns, move || {
                matches!(http_get(&addr, "/healthz"), Some((200, _)))
            })
        });
        for (i, name) in BACKENDS.into_iter().zip(["b1", "b2"]) {
            let ip = h.host(i).addr.clone();
            let name = name.to_string();
            let ns = h.host(i).ns.clone();
            let b = in_ns(&ns, move || Backend::start(&ip, &name));
            h.backends.push(b);
        }
        for (k, i) in LB.into_iter().enumerate() {
            h.lb_http.push(format!("{}:7950", h.host(i).addr));
            h.lbvips.push(None);
            h.start_lbvip(k);
        }
        h
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.net.hosts[i]
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .unwrap()
    }

    /// Node name of lb-vip `k` (0 or 1).
    pub fn lb_node(k: usize) -> &'static str {
        ["lbA", "lbB"][k]
    }

    /// Starts lb-vip `k` (0 or 1) and waits for its `/healthz`.
    pub fn start_lbvip(&mut self, k: usize) {
        let host = LB[k];
        let p = Proc::spawn(
            Self::lb_node(k),
            self.host(host)
                .command(lbvip_bin())
                .args(["--manager", &format!("http://{}", self.manager_addr)])
                .args(["--node", Self::lb_node(k)])
                .args(["--http-listen", &self.lb_http[k]])
                .args(["--vip-interface", &self.host(host).ifname])
                .args(["--connect-timeout", "300ms"])
                .env("NO_COLOR", "1")
                .env(
                    "RUST_LOG",
                    std::env::var("FABRIC_LBVIP_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdout(self.log(&format!("{}.log", Self::lb_node(k))))
                .stderr(self.log(&format!("{}.log", Self::lb_node(k)))),
        );
        self.lbvips[k] = Some(p);
        let ns = self.host(host).ns.clone();
        let addr = self.lb_http[k].clone();
        self.wait("lb-vip /healthz", Duration::from_secs(30), || {
            let (ns, addr) = (ns.clone(), addr.clone());
            in_ns(&ns, move || {
                matches!(http_get(&addr, "/healthz"), Some((200, _)))
            })
        });
    }

    /// SIGKILLs lb-vip `k`.
    pub fn kill_lbvip(&mut self, k: usize) {
        if let Some(mut p) = self.lbvips[k].take() {
            p.kill();
        }
    }

    /// SIGTERMs lb-vip `k` and waits (bounded) for it to exit; its exit status.
    pub fn terminate_lbvip(
        &mut self,
        k: usize,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut p = self.lbvips[k].take()?;
        // SAFETY: kill(2) takes no pointers; the pid is our child's (not yet reaped).
        unsafe { libc::kill(p.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = p.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// One API call to the manager from the client host: (status, JSON body or Null).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (addr, method, path) = (
            self.manager_addr.clone(),
            method.to_string(),
            path.to_string(),
        );
        in_ns(&self.host(CLIENT).ns.clone(), move || {
            let Ok(mut s) =
                TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
            else {
                return (0, serde_json::Value::Null);
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let _ = write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
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
        })
    }

    /// Creates VIP `web` at `vip` (Maglev, TCP checks every 300 ms) with both backends.
    pub fn create_vip(&self, vip: SocketAddrV4) {
        let (st, v) = self.api(
            "POST",
            "/v1/vips",
            Some(serde_json::json!({
                "name": "web", "addr": vip.to_string(), "proto": "tcp", "algo": "maglev",
                "check": {"kind": "tcp", "interval_ms": 300, "timeout_ms": 200, "rise": 1, "fall": 2},
            })),
        );
        assert_eq!(st, 201, "{v}");
        for b in &self.backends {
            let (st, v) = self.api(
                "POST",
                "/v1/vips/web/backends",
                Some(serde_json::json!({"addr": b.addr})),
            );
            assert_eq!(st, 201, "{v}");
        }
    }

    /// Which lb-vip instances (0, 1) have `ip` on their interface now.
    pub fn holders_of(&self, ip: &str) -> Vec<usize> {
        holders(&self.lb_hosts(), ip)
    }

    /// The two lb-vip hosts.
    pub fn lb_hosts(&self) -> Vec<Host> {
        LB.iter().map(|&i| self.host(i).clone()).collect()
    }

    /// The lease holder by the manager (None: no lease, or it ended).
    pub fn lease(&self) -> Option<serde_json::Value> {
        let (st, v) = self.api("GET", "/v1/vips/web", None);
        if st != 200 {
            return None;
        }
        Some(v["lease"].clone()).filter(|l| !l.is_null())
    }

    /// A metric of lb-vip `k` (`name{vip="web"}`), read inside its host.
    pub fn lb_metric(&self, k: usize, name: &str) -> Option<f64> {
        let (ns, addr) = (self.host(LB[k]).ns.clone(), self.lb_http[k].clone());
        let key = format!("{name}{{vip=\"web\"}} ");
        in_ns(&ns, move || {
            http_get(&addr, "/metrics")?
                .1
                .lines()
                .find_map(|l| l.strip_prefix(&key).and_then(|v| v.trim().parse().ok()))
        })
    }

    /// A request from the client host, source port `port`, to `vip`.
    pub fn request(
        &self,
        port: u16,
        vip: SocketAddrV4,
        timeout: Duration,
    ) -> Result<String, String> {
        let src = SocketAddrV4::new(self.host(CLIENT).addr.parse().unwrap(), port);
        in_ns(&self.host(CLIENT).ns.clone(), move || {
            request_from(src, vip, timeout)
        })
    }

    /// Polls `f` every 20 ms; panics with the logs after `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemons' logs (last lines each), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in ["volume-mgr.log", "lbA.log", "lbB.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            s += &format!("--- {n} (last lines) ---\n");
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for HaNet {
    fn drop(&mut self) {
        for p in self.lbvips.iter_mut().filter_map(Option::take) {
            drop(p);
        }
        drop(self.manager.take());
        // A backend stops by connecting to itself, which works from inside its host only.
        for (b, i) in std::mem::take(&mut self.backends).into_iter().zip(BACKENDS) {
            let ns = self.host(i).ns.clone();
            in_ns(&ns, move || drop(b));
        }
    }
}

/// Which of `hosts` have `ip` on their interface now (by index).
pub fn holders(hosts: &[Host], ip: &str) -> Vec<usize> {
    let want = format!(" {ip}/");
    (0..hosts.len())
        .filter(|&k| {
            let h = &hosts[k];
            let out = Command::new("ip")
                .args(["-n", &h.ns, "-o", "addr", "show", "dev", &h.ifname])
                .output()
                .expect("ip");
            String::from_utf8_lossy(&out.stdout).contains(&want)
        })
        .collect()
}

/// The MAC address of `host`'s interface.
pub fn mac_of(host: &Host) -> String {
    let out = crate::run(Command::new("ip").args([
        "-n",
        &host.ns,
        "-o",
        "link",
        "show",
        "dev",
        &host.ifname,
    ]));
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"))
        .to_string()
}

/// The MAC `host`'s neighbour table has for `ip` (None: no entry, or one without an address).
pub fn neigh_mac(host: &Host, ip: &str) -> Option<String> {
    let out = crate::run(Command::new("ip").args(["-n", &host.ns, "neigh", "show", ip]));
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_string)
}

/// The address as a `SocketAddrV4`.
pub fn v4(s: &str) -> SocketAddrV4 {
    match s.parse::<SocketAddr>().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}
