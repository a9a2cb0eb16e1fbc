//! blockd's NBD server over its real chunk store, driven by clients nobody here wrote:
//! qemu-io, qemu-img, nbdinfo and nbdcopy, over TCP and the unix socket; plus hostile raw
//! traffic that must get the error the spec names without disturbing other connections.

use blockd::chunkstore::{ChunkStore, DiskConfig};
use blockd::nbdgw::{self, NbdMetrics};
use blockd::volume::{VolumeCatalog, VolumeInfo, VolumeLookup};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

struct Static;
impl VolumeLookup for Static {
    async fn lookup(&self, _name: &str) -> Option<VolumeInfo> {
        None
    }
}

struct Server {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    port: u16,
    sock: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is not installed (tests/run installs it)");
}

fn server(volumes: &[(&str, u64, u64)], disk_size: u64) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        ChunkStore::open(&[DiskConfig {
            path: dir.path().join("disk0"),
            size: Some(disk_size),
        }])
        .unwrap(),
    );
    let cat = Arc::new(VolumeCatalog::new(store, Static));
    let infos: Vec<VolumeInfo> = volumes
        .iter()
        .map(|(n, id, s)| VolumeInfo {
            name: n.to_string(),
            id: *id,
            size: *s,
        })
        .collect();
    cat.sync(&infos);
    let metrics = Arc::new(NbdMetrics::default());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let sock = dir.path().join("nbd.sock");
    let port = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(nbdgw::serve_tcp(
            l,
            cat.clone(),
            metrics.clone(),
            rx.clone(),
        ));
        let u = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(nbdgw::serve_unix(
            u,
            cat.clone(),
            metrics.clone(),
            rx.clone(),
        ));
        port
    });
    Server {
        _rt: rt,
        _dir: dir,
        port,
        sock,
        stop,
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn qemu_io(url: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(url);
    let text = run(&mut c);
    assert!(
        !text.contains("failed")
            && !text.contains("Pattern verification")
            && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

#[test]
fn qemu_io_patterns_aio_discard_zero() {
    require("qemu-io");
    let s = server(&[("vol", 1, 64 << 20)], 256 << 20);
    let tcp = format!("nbd://127.0.0.1:{}/vol", s.port);
    let unix = format!("nbd+unix:///vol?socket={}", s.sock.display());
    qemu_io(
        &tcp,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4190208 8192",
            "write -P 0x11 512 512",
            "flush",
        ],
    );
    qemu_io(
        &unix,
        &[
            "read -P 0xab 1024 1047552",
            "read -P 0x11 512 512",
            "read -P 0xcd 4190208 8192",
            "read -P 0 2M 1M",
        ],
    );
    // Many requests in flight at once.
    qemu_io(
        &tcp,
        &[
            "aio_write -P 0x21 8M 1M",
            "aio_write -P 0x22 9M 1M",
            "aio_write -P 0x23 10M 64k",
            "aio_flush",
            "aio_read -P 0x21 8M 1M",
            "aio_read -P 0x22 9M 1M",
            "aio_flush",
        ],
    );
    // Discard and write-zeroes (with and without unmap), FUA writes.
    qemu_io(
        &tcp,
        &[
            "discard 8M 1M",
            "read -P 0 8M 1M",
            "write -z 9M 64k",
            "read -P 0 9M 64k",
            "write -z -u 9M 1M",
            "read -P 0 9M 1M",
            "write -f -P 0x44 20M 4k",
            "read -P 0x44 20M 4k",
        ],
    );
}

#[test]
fn nbdinfo_lists_and_maps_holes() {
    require("nbdinfo");
    let s = server(&[("alpha", 1, 64 << 20), ("beta", 2, 8 << 20)], 256 << 20);
    let list =
        run(Command::new("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", s.port)]));
    assert!(list.contains("alpha") && list.contains("beta"), "{list}");
    let info = run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/alpha", s.port)));
    assert!(info.contains("67108864"), "size: {info}");
    assert!(
        info.contains("can_multi_conn: true") && info.contains("can_fast_zero: true"),
        "{info}"
    );
    let url = format!("nbd://127.0.0.1:{}/alpha", s.port);
    qemu_io(&url, &["write -P 1 0 8M", "discard 2M 2M"]);
    let map = run(Command::new("nbdinfo").args(["--map", &url]));
    // Data 0-2M, hole 2M-4M, data 4M-8M, hole after.
    let lines: Vec<&str> = map.lines().collect();
    assert!(
        lines.iter().any(|l| l.trim_start().starts_with("0")
            && l.contains("2097152")
            && l.contains("data")),
        "{map}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("2097152") && l.contains("hole")),
        "{map}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("8388608") && l.contains("hole")),
        "{map}"
    );
    let err = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{}/nope", s.port))
        .output()
        .unwrap();
    assert!(!err.status.success());
}

#[test]
fn nbdcopy_and_qemu_img_round_trip() {
    require("nbdcopy");
    require("qemu-img");
    let s = server(&[("vol", 1, 32 << 20)], 256 << 20);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 32 << 20];
    let mut x: u32 = 12345;
    for (i, b) in data.iter_mut().enumerate() {
        // Random data with some zero runs, so sparseness paths run too.
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = if (i >> 20) % 5 == 2 {
            0
        } else {
            (x >> 16) as u8
        };
    }
    std::fs::write(&src, &data).unwrap();
    let url = format!("nbd://127.0.0.1:{}/vol", s.port);
    run(Command::new("nbdcopy").args(["--connections=4", src.to_str().unwrap(), &url]));
    let back = dir.path().join("back.raw");
    run(Command::new("nbdcopy").args(["--connections=4", &url, back.to_str().unwrap()]));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    // qemu-img: info, compare, convert out to qcow2 and in again.
    let info = run(Command::new("qemu-img").args(["info", "-f", "raw", &url]));
    assert!(info.contains("32 MiB"), "{info}");
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &url,
    ]));
    let q = dir.path().join("out.qcow2");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &url,
        q.to_str().unwrap(),
    ]));
    qemu_io(&url, &["write -z 0 32M"]);
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "raw",
        q.to_str().unwrap(),
        &url,
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &url,
    ]));
}

// --- hostile raw traffic -------------------------------------------------------------------

fn connect_go(port: u16, name: &str, structured: bool) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    if structured {
        opt(&mut s, 8, &[]);
        let (_, rep, _) = opt_reply(&mut s);
        assert_eq!(rep, 1);
    }
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut s, 7, &p);
    loop {
        let (_, rep, _) = opt_reply(&mut s);
        if rep == 1 {
            break;
        }
        assert_eq!(rep, 3, "expected INFO replies then ACK");
    }
    s
}

fn opt(s: &mut std::net::TcpStream, o: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&o.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

fn opt_reply(s: &mut std::net::TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        d,
    )
}

fn request(
    s: &mut std::net::TcpStream,
    magic: u32,
    flags: u16,
    kind: u16,
    cookie: u64,
    off: u64,
    len: u32,
) {
    let mut b = magic.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&off.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).unwrap();
}

fn simple_reply(s: &mut std::net::TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

fn is_closed(s: &mut std::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

const M: u32 = 0x2560_9513;

#[test]
fn hostile_requests_get_spec_errors() {
    let size = 8u64 << 20;
    let s = server(&[("vol", 1, size)], 64 << 20);
    let mut c = connect_go(s.port, "vol", false);
    // Unknown command, unknown flag, read past the end, zero length, oversized read.
    request(&mut c, M, 0, 42, 1, 0, 512);
    assert_eq!(simple_reply(&mut c), (22, 1));
    request(&mut c, M, 0x80, 0, 2, 0, 512);
    assert_eq!(simple_reply(&mut c), (22, 2));
    request(&mut c, M, 0, 0, 3, size - 512, 1024);
    assert_eq!(simple_reply(&mut c), (22, 3));
    request(&mut c, M, 0, 0, 4, 0, 0);
    assert_eq!(simple_reply(&mut c), (22, 4));
    request(&mut c, M, 0, 0, 5, 0, (32 << 20) + 1);
    assert_eq!(simple_reply(&mut c), (22, 5));
    // Write past the end: ENOSPC, payload skipped, connection still in sync.
    request(&mut c, M, 0, 1, 6, size - 512, 1024);
    c.write_all(&[0xee; 1024]).unwrap();
    assert_eq!(simple_reply(&mut c), (28, 6));
    // BLOCK_STATUS without a negotiated context.
    request(&mut c, M, 0, 7, 7, 0, 4096);
    assert_eq!(simple_reply(&mut c), (22, 7));
    // A normal write and read still work and nothing of the refused write landed.
    request(&mut c, M, 0, 1, 8, 4096, 4);
    c.write_all(b"okay").unwrap();
    assert_eq!(simple_reply(&mut c), (0, 8));
    request(&mut c, M, 0, 0, 9, size - 512, 512);
    assert_eq!(simple_reply(&mut c), (0, 9));
    let mut tail = vec![0u8; 512];
    c.read_exact(&mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "refused write must not land");

    // Oversized write: error then disconnect (its payload cannot be skipped safely).
    let mut big = connect_go(s.port, "vol", true);
    request(&mut big, M, 0, 1, 10, 0, 64 << 20);
    let mut h = [0u8; 20];
    big.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &0x668e_33efu32.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([h[6], h[7]]),
        32769,
        "structured ERROR chunk"
    );
    let mut rest = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    big.read_exact(&mut rest).unwrap();
    assert_eq!(u32::from_be_bytes(rest[..4].try_into().unwrap()), 22);
    assert!(is_closed(&mut big));

    // Bad magic: disconnect.
    let mut bad = connect_go(s.port, "vol", false);
    request(&mut bad, 0xdead_beef, 0, 0, 1, 0, 512);
    assert!(is_closed(&mut bad));

    // Truncated header, then close; and a client that vanishes mid-WRITE payload.
    let mut t = connect_go(s.port, "vol", false);
    t.write_all(&M.to_be_bytes()).unwrap();
    drop(t);
    let mut w = connect_go(s.port, "vol", false);
    request(&mut w, M, 0, 1, 11, 0, 8192);
    w.write_all(&[0x77; 4096]).unwrap();
    drop(w);
    std::thread::sleep(Duration::from_millis(200));
    // The first connection is unaffected and block 0 has no trace of the partial write.
    request(&mut c, M, 0, 0, 12, 0, 8192);
    assert_eq!(simple_reply(&mut c), (0, 12));
    let mut d = vec![0u8; 8192];
    c.read_exact(&mut d).unwrap();
    assert!(
        d[..4096].iter().all(|&b| b == 0),
        "partial write must not be applied"
    );
    assert_eq!(&d[4096..4100], b"okay");
    // DISC closes cleanly.
    request(&mut c, M, 0, 2, 13, 0, 0);
    assert!(is_closed(&mut c));
}

#[test]
fn handshake_errors() {
    let s = server(&[("vol", 1, 1 << 20)], 64 << 20);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&1u32.to_be_bytes()).unwrap();
    // Unknown option -> ERR_UNSUP; GO on an unknown export -> ERR_UNKNOWN; LIST with data ->
    // ERR_INVALID; SET_META_CONTEXT before STRUCTURED_REPLY -> ERR_INVALID; STARTTLS -> UNSUP.
    opt(&mut c, 99, b"xyz");
    assert_eq!(opt_reply(&mut c).1, 0x8000_0001);
    let mut p = 4u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"nope");
    p.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut c, 7, &p);
    assert_eq!(opt_reply(&mut c).1, 0x8000_0006);
    opt(&mut c, 3, b"x");
    assert_eq!(opt_reply(&mut c).1, 0x8000_0003);
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend_from_slice(b"vol");
    m.extend_from_slice(&0u32.to_be_bytes());
    opt(&mut c, 10, &m);
    assert_eq!(opt_reply(&mut c).1, 0x8000_0003);
    opt(&mut c, 5, &[]);
    assert_eq!(opt_reply(&mut c).1, 0x8000_0001);
    // Malformed GO payload (name longer than the option).
    opt(&mut c, 7, &[0, 0, 1, 0, b'a']);
    assert_eq!(opt_reply(&mut c).1, 0x8000_0003);
    // Structured replies, then list and set base:allocation.
    opt(&mut c, 8, &[]);
    assert_eq!(opt_reply(&mut c).1, 1);
    let mut q = 3u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"vol");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&15u32.to_be_bytes());
    q.extend_from_slice(b"base:allocation");
    opt(&mut c, 10, &q);
    let (_, rep, data) = opt_reply(&mut c);
    assert_eq!(rep, 4);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(opt_reply(&mut c).1, 1);
    // ABORT ends it.
    opt(&mut c, 2, &[]);
    assert_eq!(opt_reply(&mut c).1, 1);
    assert!(is_closed(&mut c));
    // Bad option magic closes; unknown client flags close.
    let mut d = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    d.read_exact(&mut greet).unwrap();
    d.write_all(&0x100u32.to_be_bytes()).unwrap();
    assert!(is_closed(&mut d));
}

#[test]
fn full_disk_gives_enospc_and_keeps_data() {
    require("qemu-io");
    // A 20 MiB disk holds 4 chunk slots (4 MiB each, after 4 MiB of metadata); the volume is
    // bigger (thin provisioning with overcommit).
    let s = server(&[("big", 1, 64 << 20)], 20 << 20);
    let url = format!("nbd://127.0.0.1:{}/big", s.port);
    qemu_io(&url, &["write -P 0x61 0 16M", "flush"]);
    // The fifth chunk has nowhere to go: ENOSPC ("No space left on device"), not corruption.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x62 16M 4k", &url])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("No space left on device"), "{text}");
    // Everything written before is intact, the unwritable range reads as zeroes, and writes
    // into chunks that exist still succeed.
    qemu_io(
        &url,
        &[
            "read -P 0x61 0 16M",
            "read -P 0 16M 4k",
            "write -P 0x63 4M 4k",
            "read -P 0x63 4M 4k",
        ],
    );
}
