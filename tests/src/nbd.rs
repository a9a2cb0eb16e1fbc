//! NBD servers the same tests run against: Fabric's blockd (`cluster::Fabric`) or, to prove
//! the harness itself, `qemu-nbd` serving a raw file.

use crate::{free_port, wait_for, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Something that serves NBD exports over a unix socket and TCP.
pub trait NbdServer {
    /// A short name for messages ("fabric", "qemu-nbd").
    fn name(&self) -> &str;
    /// `nbd+unix:///EXPORT?socket=SOCK`, as QEMU's `-drive file=` and libnbd take it.
    fn unix_url(&self, export: &str) -> String;
    /// `nbd://127.0.0.1:PORT/EXPORT`.
    fn tcp_url(&self, export: &str) -> String;
    /// Server logs for failure messages.
    fn diagnostics(&self) -> String {
        String::new()
    }
}

/// `qemu-nbd --cache=none --aio=io_uring` serving one raw file as export `export`, on a unix
/// socket and on TCP. qemu-nbd has one listener per process, so two processes share the file
/// (image locking off; both use O_DIRECT, so they see each other's writes).
pub struct QemuNbd {
    pub export: String,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    procs: Vec<Proc>,
    dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Creates a sparse raw file of `size` bytes and serves it as `export`.
    pub fn start(export: &str, size: u64) -> QemuNbd {
        crate::require("qemu-nbd");
        crate::require("nbdinfo");
        let dir = tempfile::Builder::new()
            .prefix("qemu-nbd-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let mut s = QemuNbd {
            export: export.to_string(),
            socket: dir.path().join("nbd.sock"),
            port: free_port(),
            image,
            procs: Vec::new(),
            dir,
        };
        let opts = format!(
            "driver=raw,file.driver=file,file.filename={},file.locking=off",
            s.image.display()
        );
        let port = s.port.to_string();
        let sock = s.socket.display().to_string();
        for (name, listen) in [
            ("qemu-nbd-unix", vec!["-k", sock.as_str()]),
            ("qemu-nbd-tcp", vec!["-b", "127.0.0.1", "-p", port.as_str()]),
        ] {
            let log = std::fs::File::create(s.dir.path().join(format!("{name}.log"))).unwrap();
            s.procs.push(Proc::spawn(
                name,
                Command::new("qemu-nbd")
                    .args([
                        "--cache=none",
                        "--aio=io_uring",
                        "--persistent",
                        "--shared=16",
                    ])
                    .args(["-x", export])
                    .args(listen)
                    .args(["--image-opts", &opts])
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            ));
        }
        for url in [s.unix_url(export), s.tcp_url(export)] {
            wait_for(
                &format!("qemu-nbd at {url}"),
                Duration::from_secs(20),
                || crate::try_run(Command::new("nbdinfo").args(["--size", &url])).0,
            );
        }
        s
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl NbdServer for QemuNbd {
    fn name(&self) -> &str {
        "qemu-nbd"
    }
    fn unix_url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
    fn tcp_url(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }
    fn diagnostics(&self) -> String {
        ["qemu-nbd-unix.log", "qemu-nbd-tcp.log"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}\n{}",
                    std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default()
                )
            })
            .collect()
    }
}
