//! A QEMU guest boots with a Fabric volume as its virtio disk over NBD (the unix socket, as
//! DESIGN.md's QEMU line has it), writes a pattern to /dev/vda, powers off; a second boot
//! reads it back. The host then checks the bytes through NBD with qemu-img as well.

use fabric_tests::fabric::Fabric;
use fabric_tests::guest::{markers, Assets};
use std::time::Duration;

#[test]
fn guest_writes_reboots_and_reads_back() {
    fabric_tests::require("qemu-img");
    let assets = Assets::prepare();
    let f = Fabric::start("2G");
    let (ok, out) = f.fabctl(&["volume", "create", "vm1", "--size", "256M"]);
    assert!(ok, "{out}");
    let drive = f.unix_url("vm1");

    let first = assets.boot(&drive, "write", Duration::from_secs(180));
    assert_eq!(markers(&first, "WROTE").len(), 1, "{first}");
    let pattern = markers(&first, "PATTERN");
    assert_eq!(pattern.len(), 1, "{first}");

    let second = assets.boot(&drive, "read", Duration::from_secs(180));
    let reads = markers(&second, "READ");
    assert_eq!(reads.len(), 3, "{second}");
    for r in &reads {
        let md5 = r.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(
            md5, pattern[0],
            "region {r} differs after reboot; console:\n{second}"
        );
    }

    // The host sees the same bytes through the TCP export.
    let img = f.path().join("vm1.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &f.tcp_url("vm1")])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&img).unwrap();
    let unit = b"fabric-pattern-0123456789abcdef\n";
    let mut pat = Vec::with_capacity(1 << 20);
    while pat.len() < 1 << 20 {
        pat.extend_from_slice(unit);
    }
    pat.truncate(1 << 20);
    for off in [0usize, 16, 100] {
        assert!(
            data[off << 20..(off + 1) << 20] == pat[..],
            "region at {off} MiB differs"
        );
    }
    assert!(
        data[1 << 20..16 << 20].iter().all(|&b| b == 0),
        "nothing else was written"
    );
    assert!(!f.blockd_log().contains("checksum mismatch"));
}
