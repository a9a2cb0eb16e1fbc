//! Health checks. [`Health`] is the pure state machine (time is an argument, as in smoltcp's
//! `poll(timestamp)`): active check results with HAProxy's rise/fall counting, plus passive
//! detection ([`Health::mark_down`]: a refused or timed-out connect takes the backend out at
//! once). [`probe`] is the thin I/O part: one TCP-connect or HTTP GET check.
//!
//! Semantics (as HAProxy): a backend starts **up**; `fall` consecutive failures take it down,
//! `rise` consecutive successes bring it back. So a backend that dies is out after at most
//! `fall` checks, i.e. within `fall × interval` (plus one check timeout), and much earlier
//! when a connection attempt sees it dead first.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// HAProxy's defaults.
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;

/// What an active check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect that completes within the timeout.
    Tcp,
    /// `GET path HTTP/1.0`; the status line must carry `status`.
    Http { path: String, status: u16 },
}

/// Check settings of one VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckParams {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

impl Default for CheckParams {
    fn default() -> Self {
        CheckParams {
            kind: CheckKind::Tcp,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }
}

/// A change of health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// The health state of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    up: bool,
    /// Consecutive successes while down / failures while up.
    streak: u32,
    transitions: u64,
    since_ms: u64,
    last_error: Option<String>,
}

impl Health {
    /// A new backend: up (as HAProxy starts servers).
    pub fn new(now_ms: u64) -> Health {
        Health {
            up: true,
            streak: 0,
            transitions: 0,
            since_ms: now_ms,
            last_error: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Up/down changes so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// When the current state began.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn flip(&mut self, up: bool, now_ms: u64) -> Transition {
        self.up = up;
        self.streak = 0;
        self.transitions += 1;
        self.since_ms = now_ms;
        if up {
            Transition::Up
        } else {
            Transition::Down
        }
    }

    /// Records one active check result; returns the transition it caused, if any.
    pub fn record(
        &mut self,
        result: Result<(), String>,
        p: &CheckParams,
        now_ms: u64,
    ) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.last_error = None;
                if self.up {
                    self.streak = 0;
                    None
                } else {
                    self.streak += 1;
                    (self.streak >= p.rise.max(1)).then(|| self.flip(true, now_ms))
                }
            }
            Err(e) => {
                self.last_error = Some(e);
                if self.up {
                    self.streak += 1;
                    (self.streak >= p.fall.max(1)).then(|| self.flip(false, now_ms))
                } else {
                    self.streak = 0;
                    None
                }
            }
        }
    }

    /// Passive detection: a connection attempt was refused or timed out. Down at once (it
    /// then needs `rise` good checks to come back).
    pub fn mark_down(&mut self, why: String, now_ms: u64) -> Option<Transition> {
        self.last_error = Some(why);
        if self.up {
            Some(self.flip(false, now_ms))
        } else {
            self.streak = 0;
            None
        }
    }
}

#[derive(Debug, Error)]
pub enum CheckError {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("http: {0}")]
    Io(std::io::Error),
    #[error("http: bad status line")]
    BadResponse,
    #[error("http: status {got}, expected {want}")]
    Status { got: u16, want: u16 },
}

/// Runs one check against `addr` (bounded by the timeout).
/// With `netns`, the connection is made from that namespace (an overlay VIP's backends).
pub async fn probe(
    addr: SocketAddr,
    p: &CheckParams,
    netns: Option<&crate::overlay::NetnsSockets>,
) -> Result<(), CheckError> {
    let limit = Duration::from_millis(p.timeout_ms.max(1));
    match tokio::time::timeout(limit, probe_inner(addr, &p.kind, netns, limit)).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(p.timeout_ms)),
    }
}

async fn probe_inner(
    addr: SocketAddr,
    kind: &CheckKind,
    netns: Option<&crate::overlay::NetnsSockets>,
    limit: Duration,
) -> Result<(), CheckError> {
    let mut s = match netns {
        Some(ns) => ns.tcp_connect(addr, limit).await,
        None => tokio::net::TcpStream::connect(addr).await,
    }
    .map_err(CheckError::Connect)?;
    let (path, want) = match kind {
        CheckKind::Tcp => return Ok(()),
        CheckKind::Http { path, status } => (path, *status),
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-vip-check\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(CheckError::Io)?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        let r = s.read(&mut buf[n..]).await.map_err(CheckError::Io)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let got = parse_status(&buf[..n]).ok_or(CheckError::BadResponse)?;
    if got == want {
        Ok(())
    } else {
        Err(CheckError::Status { got, want })
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
pub fn parse_status(buf: &[u8]) -> Option<u16> {
    let rest = buf.strip_prefix(b"HTTP/1.")?;
    let rest = rest.get(1..)?.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit)
        || rest.get(3).is_some_and(|c| *c != b' ' && *c != b'\r')
    {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> CheckParams {
        CheckParams::default()
    }

    #[test]
    fn starts_up_and_falls_after_fall_failures() {
        let p = params();
        let mut h = Health::new(0);
        assert!(h.is_up());
        assert_eq!(h.record(Err("x".into()), &p, 2_000), None);
        assert_eq!(h.record(Err("x".into()), &p, 4_000), None);
        assert!(h.is_up());
        assert_eq!(h.record(Err("x".into()), &p, 6_000), Some(Transition::Down));
        assert!(!h.is_up());
        // Down within fall × interval of the first failed check.
        assert!(h.since_ms() <= u64::from(p.fall) * p.interval_ms);
        assert_eq!(h.transitions(), 1);
        assert_eq!(h.last_error(), Some("x"));
    }

    #[test]
    fn a_success_resets_the_fall_count() {
        let p = params();
        let mut h = Health::new(0);
        h.record(Err("x".into()), &p, 1);
        h.record(Err("x".into()), &p, 2);
        h.record(Ok(()), &p, 3);
        h.record(Err("x".into()), &p, 4);
        h.record(Err("x".into()), &p, 5);
        assert!(h.is_up());
        assert_eq!(h.record(Err("x".into()), &p, 6), Some(Transition::Down));
    }

    #[test]
    fn rises_after_rise_successes() {
        let p = params();
        let mut h = Health::new(0);
        assert_eq!(h.mark_down("refused".into(), 10), Some(Transition::Down));
        assert_eq!(h.mark_down("refused".into(), 11), None);
        assert_eq!(h.record(Ok(()), &p, 20), None);
        assert!(!h.is_up());
        // A failure in between restarts the rise count.
        h.record(Err("x".into()), &p, 30);
        assert_eq!(h.record(Ok(()), &p, 40), None);
        assert_eq!(h.record(Ok(()), &p, 50), Some(Transition::Up));
        assert!(h.is_up());
        assert_eq!(h.since_ms(), 50);
        assert_eq!(h.transitions(), 2);
        assert_eq!(h.last_error(), None);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let p = CheckParams {
            rise: 0,
            fall: 0,
            ..params()
        };
        let mut h = Health::new(0);
        assert_eq!(h.record(Err("x".into()), &p, 1), Some(Transition::Down));
        assert_eq!(h.record(Ok(()), &p, 2), Some(Transition::Up));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"HTTP/2 200"), None);
        assert_eq!(parse_status(b""), None);
        assert_eq!(parse_status(b"\xff\xfe"), None);
    }

    #[tokio::test]
    async fn probes_real_sockets() {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut b = [0u8; 512];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&b[..n]).to_string();
                    let resp = if req.starts_with("GET /ok ") {
                        "HTTP/1.0 200 OK\r\n\r\n"
                    } else {
                        "HTTP/1.0 404 Not Found\r\n\r\n"
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        let tcp = params();
        probe(addr, &tcp, None).await.unwrap();
        let http = |path: &str, status| CheckParams {
            kind: CheckKind::Http {
                path: path.into(),
                status,
            },
            ..params()
        };
        probe(addr, &http("/ok", 200), None).await.unwrap();
        assert!(matches!(
            probe(addr, &http("/nope", 200), None).await,
            Err(CheckError::Status {
                got: 404,
                want: 200
            })
        ));
        // A closed port: refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            probe(closed, &tcp, None).await,
            Err(CheckError::Connect(_))
        ));
        // A listener that never answers an HTTP check: timeout.
        let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = CheckParams {
            timeout_ms: 100,
            ..http("/ok", 200)
        };
        assert!(matches!(
            probe(mute.local_addr().unwrap(), &p, None).await,
            Err(CheckError::Timeout(100))
        ));
    }
}
