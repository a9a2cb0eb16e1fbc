//! End-to-end test helpers: start the real Fabric binaries (`fabric`), boot a real QEMU
//! guest (`guest`), and check for the real client tools the tests drive.

pub mod fabric;
pub mod guest;

use std::process::{Command, Stdio};

/// Fails (not skips) when a tool the tests rely on is missing: `tests/run` installs them.
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
        "{tool} is not installed; run tests/run (it installs the test dependencies)"
    );
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
