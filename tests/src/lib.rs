//! End-to-end test helpers: start the real Fabric binaries (`cluster`), serve a raw file with
//! qemu-nbd instead (`nbd`), boot a real QEMU guest on either (`guest`), and drive the real
//! client tools (qemu-img, qemu-io, nbdinfo, nbdcopy).

pub mod cluster;
pub mod etcd;
pub mod fabric_e2e;
pub mod guest;
pub mod lbvip;
pub mod lbvip_ha;
pub mod multihost;
pub mod nbd;
pub mod netns;
pub mod overlay;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails (not skips) when a tool the tests rely on is missing: `.ci/run` / `tests/run` install
/// them.
pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed; run .ci/run or tests/run (they install the test dependencies)"
    );
}

/// A free TCP port on loopback (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion; returns (success, stdout + stderr).
pub fn try_run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs a command to completion, panics unless it succeeds; returns stdout + stderr.
pub fn run(cmd: &mut Command) -> String {
    let (ok, out) = try_run(cmd);
    assert!(ok, "{cmd:?} failed:\n{out}");
    out
}

/// A child process in its own process group, SIGKILLed (the whole group) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Spawns `cmd` (stdin from /dev/null) as the leader of a new process group.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGKILLs the process group and reaps the leader.
    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pgid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) takes no pointers; a negative pid names the process group this
            // child leads (process_group(0)), which only holds processes we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for test data without a rand dependency.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes a `len`-byte file of random data with a few all-zero stretches (so sparse handling
/// and zero detection get exercised too).
pub fn random_file(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let mut data = random_bytes(seed, len);
    let mib = 1 << 20;
    for hole in [len / 4, len / 2 + 3 * 4096] {
        let end = (hole + mib).min(len);
        data[hole..end].fill(0);
    }
    std::fs::write(path, &data).unwrap();
    data
}
