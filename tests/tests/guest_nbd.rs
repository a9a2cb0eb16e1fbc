//! A QEMU guest (Debian kernel, busybox initramfs, TCG) boots with an NBD export as its virtio
//! disk, writes patterns to /dev/vda and powers off; a second boot reads them back and
//! verifies them; the host then checks the same bytes through NBD. The same test runs against
//! Fabric (volume-mgr + blockd, the real binaries) and against qemu-nbd (which proves the
//! harness itself).

use fabric_tests::cluster::Fabric;
use fabric_tests::guest::{pattern, Assets, REGION};
use fabric_tests::nbd::{NbdServer, QemuNbd};
use fabric_tests::run;
use std::process::Command;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Region offsets in MiB: the first, inside the second 4 MiB chunk, the middle, the last.
const OFFSETS: [&str; 4] = ["0", "5", "100", "255"];

/// Writes with one boot over `write_url`, verifies with a second over `read_url`, then reads
/// the whole export on the host over TCP.
fn guest_round_trip(server: &dyn NbdServer, export: &str, write_url: &str, read_url: &str) {
    let assets = Assets::get();
    let seed = format!("{}-{}", server.name(), std::process::id());
    let mut args = vec![seed.as_str()];
    args.extend(OFFSETS);

    let first = assets.boot(Some(write_url), "write-pattern", &args, BOOT_TIMEOUT);
    if first.result().is_none() {
        eprintln!("{}", server.diagnostics());
    }
    first.expect_ok();
    assert_eq!(
        first.markers("WROTE").len(),
        OFFSETS.len(),
        "{}",
        first.text
    );

    let second = assets.boot(Some(read_url), "verify-pattern", &args, BOOT_TIMEOUT);
    if second.result().is_none() {
        eprintln!("{}", server.diagnostics());
    }
    second.expect_ok();
    let reads = second.markers("READ");
    assert_eq!(reads.len(), OFFSETS.len(), "{}", second.text);
    assert!(reads.iter().all(|r| r.ends_with(" ok")), "{}", second.text);

    // The host sees the same bytes (and nothing else) through the TCP export.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &server.tcp_url(export)])
        .arg(&img));
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len(), 256 << 20);
    let mut written = vec![false; data.len() / REGION];
    for off in OFFSETS {
        let off: u64 = off.parse().unwrap();
        let at = off as usize * REGION;
        assert!(
            data[at..at + REGION] == pattern(&seed, off)[..],
            "{}: region at {off} MiB differs on the host",
            server.name()
        );
        written[off as usize] = true;
    }
    for (i, w) in written.iter().enumerate() {
        if !w {
            let at = i * REGION;
            assert!(
                data[at..at + REGION].iter().all(|&b| b == 0),
                "{}: MiB {i} was never written but is not zero",
                server.name()
            );
        }
    }
}

#[test]
fn guest_on_fabric_volume_writes_reboots_and_reads_back() {
    fabric_tests::require("qemu-img");
    let f = Fabric::start("4G");
    f.create_volume("vm1", "256M");
    // Write over the unix socket (DESIGN.md's QEMU line), read back over TCP.
    guest_round_trip(&f, "vm1", &f.unix_url("vm1"), &f.tcp_url("vm1"));
    let log = f.blockd_log();
    assert!(!log.contains("checksum mismatch"), "{log}");
    assert!(!log.contains(" ERROR "), "{}", f.logs());
}

#[test]
fn guest_on_qemu_nbd_writes_reboots_and_reads_back() {
    fabric_tests::require("qemu-img");
    let s = QemuNbd::start("vm1", 256 << 20);
    guest_round_trip(&s, "vm1", &s.unix_url("vm1"), &s.tcp_url("vm1"));
}

#[test]
fn guest_sees_the_volume_size() {
    let f = Fabric::start("4G");
    f.create_volume("sized", "64M");
    let c = Assets::get().boot(Some(&f.tcp_url("sized")), "disk-info", &[], BOOT_TIMEOUT);
    c.expect_ok();
    let disk = c.markers("DISK");
    assert!(
        disk.first()
            .is_some_and(|d| d.starts_with(&format!("size={} ", (64u64 << 20) / 512))),
        "{}",
        c.text
    );
}

#[test]
fn guest_verify_reports_wrong_data() {
    // The harness must be able to fail: an empty disk does not hold the pattern.
    let s = QemuNbd::start("blank", 16 << 20);
    let c = Assets::get().boot(
        Some(&s.unix_url("blank")),
        "verify-pattern",
        &["nothing-written", "0", "7"],
        BOOT_TIMEOUT,
    );
    assert!(!c.timed_out, "{}", c.text);
    assert!(
        c.result()
            .is_some_and(|r| r.starts_with("fail verify-pattern")),
        "{}",
        c.text
    );
    assert_eq!(c.markers("READ").len(), 2, "{}", c.text);
    assert!(c.markers("READ").iter().all(|r| r.ends_with(" BAD")));
}

#[test]
fn guest_modules_resolve_in_dependency_order() {
    let a = Assets::get();
    let pos = |m: &str| a.modules.iter().position(|x| x == m);
    for (dep, user) in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("virtio", "virtio_blk"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
    ] {
        if let (Some(d), Some(u)) = (pos(dep), pos(user)) {
            assert!(d < u, "{dep} must load before {user}: {:?}", a.modules);
        }
    }
    assert!(
        pos("virtio_blk").is_some() && pos("virtio_pci").is_some(),
        "{:?}",
        a.modules
    );
    eprintln!("{}: {}", a.kernel.package, a.modules.join(" "));
}

#[test]
fn guest_timeout_kills_qemu_and_reports_it() {
    let a = Assets::get();
    // No disk: `need_disk` waits 10 s for /dev/vda, far beyond this timeout.
    let c = a.boot(None, "disk-info", &[], Duration::from_millis(1500));
    assert!(c.timed_out && c.result().is_none(), "{}", c.text);
    assert!(c.status.is_none());
    assert!(!c.ok());
}

#[test]
fn guest_writes_survive_blockd_kill_9() {
    // The guest's writes are O_DIRECT + fsync (NBD FLUSH): once it reports them, they must
    // survive blockd being SIGKILLed and restarted on the same disk.
    let mut f = Fabric::start("4G");
    f.create_volume("crash", "64M");
    let seed = format!("crash-{}", std::process::id());
    let args = [seed.as_str(), "0", "4", "63"];
    let a = Assets::get();
    a.boot(
        Some(&f.unix_url("crash")),
        "write-pattern",
        &args,
        BOOT_TIMEOUT,
    )
    .expect_ok();
    f.kill_blockd();
    f.start_blockd();
    let url = f.unix_url("crash");
    fabric_tests::wait_for("export after restart", Duration::from_secs(30), || {
        fabric_tests::try_run(Command::new("nbdinfo").args(["--size", &url])).0
    });
    let c = a.boot(Some(&url), "verify-pattern", &args, BOOT_TIMEOUT);
    if !c.ok() {
        eprintln!("{}", f.logs());
    }
    c.expect_ok();
    assert_eq!(c.markers("READ").len(), 3, "{}", c.text);
}
