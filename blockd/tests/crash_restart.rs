//! blockd killed with SIGKILL in the middle of writes: after a restart every flushed byte is
//! there, and no block of the volume fails its checksum (reads never return EIO).
//! Runs the real `volume-mgr` and `blockd` binaries and drives them with `qemu-io`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bin(name: &str) -> PathBuf {
    let blockd = PathBuf::from(env!("CARGO_BIN_EXE_blockd"));
    let p = blockd.parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not built (run `cargo build --workspace`)",
        p.display()
    );
    p
}

fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is not installed (tests/run installs it)");
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_blockd(dir: &Path, mgr: &str, nbd_port: u16) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("blockd.log"))
        .unwrap();
    Proc(
        Command::new(bin("blockd"))
            .args([
                "--manager",
                mgr,
                "--node",
                "n1",
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .args([
                "--nbd-listen",
                &format!("127.0.0.1:{nbd_port}"),
                "--http-listen",
                "none",
            ])
            .arg("--disk")
            .arg(format!("{}:256M", dir.join("disk0.img").display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(url).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad =
        text.contains("failed") || text.contains("error") || text.contains("Pattern verification");
    (out.status.success() && !bad, text)
}

#[test]
fn sigkill_mid_write_loses_no_flushed_data() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let mgr_url = format!("http://127.0.0.1:{mport}");
    let _mgr = Proc(
        Command::new(bin("volume-mgr"))
            .args(["--listen", &format!("127.0.0.1:{mport}"), "--data-dir"])
            .arg(dir.path().join("mgr"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(mport);
    let nbd_port = free_port();
    let mut bd = start_blockd(dir.path(), &mgr_url, nbd_port);
    wait_port(nbd_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = volume_mgr::client::Client::new(vec![mgr_url.clone()]);
    let t = Instant::now();
    loop {
        match rt.block_on(client.create_volume(&volume_mgr::api::CreateVolume {
            name: "crash".into(),
            size: 64 << 20,
            replicas: Some(1),
            min_replicas: None,
        })) {
            Ok(_) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(20), "volume create: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let url = format!("nbd://127.0.0.1:{nbd_port}/crash");
    // Flushed data: pattern 0x5a over the first 8 MiB.
    let (ok, out) = qemu_io(&url, &["write -P 0x5a 0 8M", "flush"]);
    assert!(ok, "{out}");
    // Unflushed writes in flight over the rest of the volume, then SIGKILL mid-way.
    let mut writer = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "aio_write -P 0xa5 8M 16M",
            "-c",
            "aio_write -P 0xa6 24M 16M",
            "-c",
            "aio_write -P 0xa7 40M 16M",
            "-c",
            "aio_flush",
        ])
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let _ = bd.0.kill();
    let _ = bd.0.wait();
    let _ = writer.kill();
    let _ = writer.wait();
    // Restart on the same disk.
    let _bd2 = start_blockd(dir.path(), &mgr_url, nbd_port);
    wait_port(nbd_port);
    let (ok, out) = qemu_io(&url, &["read -P 0x5a 0 8M"]);
    assert!(ok, "flushed data lost after SIGKILL: {out}");
    // Every block of the volume is readable (no checksum errors from torn records).
    let (ok, out) = qemu_io(&url, &["read 0 64M"]);
    assert!(ok, "volume unreadable after SIGKILL: {out}");
    let log = std::fs::read_to_string(dir.path().join("blockd.log")).unwrap_or_default();
    assert!(!log.contains("checksum mismatch"), "{log}");
}

/// Multi-conn: a FLUSH on one connection makes writes completed on another durable
/// (`NBD_FLAG_CAN_MULTI_CONN`). Write on A, flush on B, SIGKILL, restart: the data is there.
#[test]
fn flush_on_one_connection_covers_writes_of_another() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let mgr_url = format!("http://127.0.0.1:{mport}");
    let _mgr = Proc(
        Command::new(bin("volume-mgr"))
            .args(["--listen", &format!("127.0.0.1:{mport}"), "--data-dir"])
            .arg(dir.path().join("mgr"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(mport);
    let nbd_port = free_port();
    let mut bd = start_blockd(dir.path(), &mgr_url, nbd_port);
    wait_port(nbd_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = volume_mgr::client::Client::new(vec![mgr_url.clone()]);
    let t = Instant::now();
    while let Err(e) = rt.block_on(client.create_volume(&volume_mgr::api::CreateVolume {
        name: "mc".into(),
        size: 16 << 20,
        replicas: Some(1),
        min_replicas: None,
    })) {
        assert!(t.elapsed() < Duration::from_secs(20), "volume create: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Minimal NBD client: handshake with GO, then simple requests.
    let connect = || {
        let t = Instant::now();
        loop {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", nbd_port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut greet = [0u8; 18];
            s.read_exact(&mut greet).unwrap();
            s.write_all(&3u32.to_be_bytes()).unwrap();
            let mut opt = b"IHAVEOPT".to_vec();
            opt.extend_from_slice(&7u32.to_be_bytes());
            opt.extend_from_slice(&(4 + 2 + 2u32).to_be_bytes());
            opt.extend_from_slice(&2u32.to_be_bytes());
            opt.extend_from_slice(b"mc");
            opt.extend_from_slice(&0u16.to_be_bytes());
            s.write_all(&opt).unwrap();
            loop {
                let mut h = [0u8; 20];
                s.read_exact(&mut h).unwrap();
                let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
                s.read_exact(&mut d).unwrap();
                if rep == 1 {
                    return s;
                }
                if rep != 3 {
                    // The volume may not be known to blockd yet: retry.
                    assert!(
                        t.elapsed() < Duration::from_secs(20),
                        "GO refused: {rep:#x}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    };
    let request = |s: &mut std::net::TcpStream, kind: u16, cookie: u64, off: u64, data: &[u8]| {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            0,
            "request failed"
        );
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), cookie);
    };
    let mut a = connect();
    let mut b = connect();
    request(&mut a, 1, 1, 4 << 20, &[0x4d; 65536]); // WRITE on A
    request(&mut b, 3, 2, 0, &[]); // FLUSH on B
    let _ = bd.0.kill();
    let _ = bd.0.wait();
    drop((a, b));
    let _bd2 = start_blockd(dir.path(), &mgr_url, nbd_port);
    wait_port(nbd_port);
    let url = format!("nbd://127.0.0.1:{nbd_port}/mc");
    let (ok, out) = qemu_io(&url, &["read -P 0x4d 4M 64k"]);
    assert!(ok, "write from A not durable after FLUSH on B: {out}");
}
