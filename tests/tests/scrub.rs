//! Scrub and repair (issue 7) on namespace hosts: volume-mgr and three blockd hosts, a
//! 3-replica volume written with a qemu-io pattern through host 1's NBD. Bytes of a chunk
//! file on host 2's disk are flipped (the slot found through blockd's `/debug/chunks` route,
//! which reports where the chunk store laid the chunk out):
//! - the scrub (a pass started through `/debug/scrub`; `--scrub-interval 1h` keeps the
//!   background passes out of the way) finds the damaged block and repairs it from another
//!   replica: `blockd_scrub_repaired_total{found_by="scrub"}`, the block on disk holds the
//!   pattern again, and the pattern reads back through host 2's NBD (its own copy first);
//! - a second flip is found by a read through host 2's NBD, which is served from another copy
//!   and repairs the bad one (`found_by="read"`, the block on disk holds the pattern again).
//!
//! Bounded (well under a minute); processes and namespaces go on drop, also on failure.

use fabric_tests::multihost::{qemu_io, Cluster};
use fabric_tests::require;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const FLAGS: &[&str] = &[
    "--http-listen",
    "0.0.0.0:7801",
    "--scrub-rate",
    "64MiB/s",
    "--scrub-interval",
    "1h",
    "--replica-timeout",
    "2s",
];
const PATTERN: u8 = 0x5a;
const HOST: usize = 2;

/// (disk file, byte offset of the slot) of chunk `index` of volume `id` on host `i`.
fn locate(c: &Cluster, i: usize, id: u64, index: u64) -> (String, u64) {
    let (ok, out) = c.node_http(i, "GET", &format!("/debug/chunks/{id}/{index}"));
    assert!(ok, "locating chunk {index} on h{i}: {out}");
    let (p, o) = out.trim().rsplit_once(' ').expect("PATH OFFSET");
    (p.to_string(), o.parse().unwrap())
}

/// Flips bytes of block `b` of a slot on disk (as a bad sector or stray write would).
fn flip(path: &str, slot: u64, b: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = slot + b * 4096 + 123;
    let mut x = [0u8; 8];
    f.read_exact_at(&mut x, at).unwrap();
    assert_eq!(
        x, [PATTERN; 8],
        "the block held the pattern before the flip"
    );
    for v in &mut x {
        *v ^= 0xff;
    }
    f.write_all_at(&x, at).unwrap();
    f.sync_all().unwrap();
}

/// Whether block `b` of the slot holds the pattern on disk.
fn block_ok(path: &str, slot: u64, b: u64) -> bool {
    let f = std::fs::File::open(path).unwrap();
    let mut x = vec![0u8; 4096];
    f.read_exact_at(&mut x, slot + b * 4096).unwrap();
    x.iter().all(|&v| v == PATTERN)
}

fn metric(c: &Cluster, name: &str) -> f64 {
    c.node_metric(HOST, name).unwrap_or(-1.0)
}

fn wait_metric(c: &Cluster, name: &str, at_least: f64, limit: Duration) {
    let t = Instant::now();
    while metric(c, name) < at_least {
        assert!(
            t.elapsed() < limit,
            "{name} on h{HOST} stayed below {at_least} for {limit:?}: {}\n{}",
            c.node_http(HOST, "GET", "/metrics").1,
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_back(c: &Cluster, host: usize) {
    let (ok, out) = qemu_io(
        &c.url(host, "vol"),
        &[&format!("read -P {PATTERN:#x} 0 16M")],
    );
    assert!(ok, "read-back through h{host} failed: {out}\n{}", c.logs());
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn scrub_and_reads_repair_damaged_blocks() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-io");
    require("curl");
    let c = Cluster::start(3, "1G", FLAGS);
    c.fabctl_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "16M",
        "--replicas",
        "3",
    ]);
    let id = c.json(&["volume", "show", "vol"]).unwrap()["id"]
        .as_u64()
        .unwrap();
    let (ok, out) = qemu_io(
        &c.url(1, "vol"),
        &[&format!("write -P {PATTERN:#x} 0 16M"), "flush"],
    );
    assert!(ok, "write failed: {out}\n{}", c.logs());
    // A host that was not reachable yet when the write came is resynced first.
    c.wait_converged("vol", Duration::from_secs(30));
    let repaired_scrub = "blockd_scrub_repaired_total{found_by=\"scrub\"}";
    let repaired_read = "blockd_scrub_repaired_total{found_by=\"read\"}";
    assert_eq!(metric(&c, "blockd_scrub_errors_total"), 0.0);

    // 1. The scrub finds and repairs a damaged block.
    let (path, slot) = locate(&c, HOST, id, 1);
    flip(&path, slot, 3);
    assert!(!block_ok(&path, slot, 3));
    let t = Instant::now();
    let (ok, out) = c.node_http(HOST, "POST", "/debug/scrub");
    assert!(ok, "{out}");
    wait_metric(&c, repaired_scrub, 1.0, Duration::from_secs(20));
    eprintln!("scrub repaired the block in {:?}", t.elapsed());
    assert!(
        block_ok(&path, slot, 3),
        "the block on disk holds the pattern again"
    );
    assert_eq!(metric(&c, "blockd_scrub_errors_total"), 1.0);
    assert_eq!(metric(&c, "blockd_scrub_unrepairable_total"), 0.0);
    // The pass (the second: the first ran at start-up, before any data) read every block.
    wait_metric(
        &c,
        "blockd_scrub_passes_total",
        2.0,
        Duration::from_secs(20),
    );
    assert!(metric(&c, "blockd_scrub_bytes_total") >= (16 << 20) as f64);
    read_back(&c, HOST);
    assert_eq!(
        metric(&c, repaired_read),
        0.0,
        "host 2's own copy read back without a checksum error"
    );

    // 2. A read finds a damaged block, is served from another copy, and repairs this one.
    let (path, slot) = locate(&c, HOST, id, 2);
    flip(&path, slot, 5);
    read_back(&c, HOST);
    wait_metric(&c, repaired_read, 1.0, Duration::from_secs(20));
    assert!(
        block_ok(&path, slot, 5),
        "the block on disk holds the pattern again"
    );
    assert_eq!(metric(&c, "blockd_scrub_errors_total"), 2.0);
    assert_eq!(metric(&c, "blockd_scrub_unrepairable_total"), 0.0);
    assert_eq!(metric(&c, repaired_scrub), 1.0);
    read_back(&c, HOST);
    assert_eq!(metric(&c, repaired_read), 1.0, "no damage left to repair");
    let (ok, out) = c.verify("vol");
    assert!(ok, "{out}");
}

/// `fabctl volume verify --repair`: a damaged copy (its record still agrees with the others,
/// so a plain verify sees nothing) is found by the repair pass's checked fetch and replaced by
/// the highest good version; the verify after it exits 0.
#[test]
fn verify_repair_replaces_a_damaged_copy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-io");
    require("curl");
    // Scrub off: only the repair pass (and reads) may touch the damage.
    let flags = [
        "--http-listen",
        "0.0.0.0:7801",
        "--scrub-rate",
        "0",
        "--replica-timeout",
        "2s",
    ];
    let c = Cluster::start(3, "1G", &flags);
    c.fabctl_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "16M",
        "--replicas",
        "3",
    ]);
    let id = c.json(&["volume", "show", "vol"]).unwrap()["id"]
        .as_u64()
        .unwrap();
    let (ok, out) = qemu_io(
        &c.url(1, "vol"),
        &[&format!("write -P {PATTERN:#x} 0 16M"), "flush"],
    );
    assert!(ok, "write failed: {out}\n{}", c.logs());
    // A host that was not reachable yet when the write came is resynced first.
    c.wait_converged("vol", Duration::from_secs(30));
    let (path, slot) = locate(&c, HOST, id, 3);
    flip(&path, slot, 7);
    let (ok, out) = c.verify("vol");
    assert!(ok, "records agree, so a plain verify passes: {out}");
    let secret = c.secret_path();
    let (ok, out) = c.fabctl(&[
        "volume",
        "verify",
        "vol",
        "--repair",
        "--secret-file",
        secret.to_str().unwrap(),
    ]);
    eprintln!("{out}");
    assert!(ok, "verify --repair failed: {out}\n{}", c.logs());
    assert!(
        out.contains("REPAIRED chunk 3 on h2 <- ") && out.contains("bad checksum"),
        "{out}"
    );
    assert!(out.contains("replaced 1 copies, 0 failures"), "{out}");
    assert!(
        block_ok(&path, slot, 7),
        "the block on disk holds the pattern again"
    );
    read_back(&c, HOST);
    assert_eq!(metric(&c, "blockd_scrub_unrepairable_total"), 0.0);
}
