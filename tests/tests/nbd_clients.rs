//! Real NBD clients against the real Fabric binaries (volume-mgr + blockd, started as
//! processes; volumes made with fabctl): qemu-img, qemu-io, nbdinfo, nbdcopy and fio, over
//! the unix socket and over TCP. Export name = volume name.

use fabric_tests::cluster::Fabric;
use fabric_tests::nbd::NbdServer;
use fabric_tests::{random_bytes, random_file, require, run, try_run, wait_for};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// `qemu-io -f raw -t none -c CMD … URL`; panics (with blockd's log) unless every command
/// succeeds (qemu-io exits non-zero on a failed command or a pattern mismatch).
fn qemu_io(f: &Fabric, url: &str, cmds: &[&str]) -> String {
    require("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-t", "none"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let (ok, out) = try_run(c.arg(url));
    assert!(
        ok && !out.contains("verification failed") && !out.contains("failed:"),
        "qemu-io {cmds:?} on {url}:\n{out}\n{}",
        f.logs()
    );
    out
}

/// `nbdinfo --map --json URL` as (offset, length, type) with type bit 0 = hole, bit 1 = zero.
fn map(url: &str) -> Vec<(u64, u64, u64)> {
    require("nbdinfo");
    let out = Command::new("nbdinfo")
        .args(["--map", "--json", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo --map {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The type bits that hold over all of [off, off+len) (AND of the covering extents).
fn map_type(m: &[(u64, u64, u64)], off: u64, len: u64) -> u64 {
    let mut t = 3;
    let mut covered = 0;
    for &(o, l, ty) in m {
        if o < off + len && off < o + l {
            t &= ty;
            covered += (o + l).min(off + len) - o.max(off);
        }
    }
    assert_eq!(covered, len, "map does not cover [{off}, +{len}): {m:?}");
    t
}

fn assert_same_file(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

#[test]
fn qemu_img_info_convert_in_and_out_and_compare() {
    require("qemu-img");
    let f = Fabric::start("4G");
    f.create_volume("img", "64M");
    let unix = f.unix_url("img");
    let tcp = f.tcp_url("img");

    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        &unix,
    ])))
    .unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    assert_eq!(info["format"], "raw", "{info}");

    // In: a raw file with random data (and zero stretches) into the volume.
    let src = f.path().join("src.raw");
    random_file(&src, 1, (64 * MIB) as usize);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&unix));
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&tcp));
    assert!(cmp.contains("identical"), "{cmp}");

    // Out: the volume over TCP into qcow2, which must hold the same data.
    let out = f.path().join("out.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &tcp])
        .arg(&out));
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&out));
    assert!(cmp.contains("identical"), "{cmp}");

    // A one-byte difference is noticed (compare exits 1).
    let mut data = std::fs::read(&src).unwrap();
    data[40 * MIB as usize + 7] ^= 1;
    std::fs::write(&src, data).unwrap();
    let (same, out) = try_run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&unix),
    );
    assert!(!same && out.contains("mismatch at offset"), "{out}");
}

#[test]
fn qemu_io_aio_patterns_fua_write_zeroes_and_discard() {
    let f = Fabric::start("4G");
    f.create_volume("io", "32M");
    let unix = f.unix_url("io");
    qemu_io(
        &f,
        &unix,
        &[
            "aio_write -P 0x11 0 1M",
            "aio_write -P 0x22 1M 1M",
            "aio_write -P 0x33 4092k 8k", // straddles the 4 MiB chunk boundary
            "aio_write -P 0x44 31M 1M",
            "aio_flush",
            "write -f -P 0x55 12M 4k", // FUA
            "aio_read -P 0x11 0 1M",
            "aio_read -P 0x22 1M 1M",
            "aio_read -P 0x33 4092k 8k",
            "aio_flush",
            "write -z 1M 512k", // WRITE_ZEROES
            "read -P 0 1M 512k",
            "read -P 0x22 1536k 512k",
            "flush",
        ],
    );
    // A new connection (over TCP) sees the same data; unaligned I/O works too.
    let tcp = f.tcp_url("io");
    qemu_io(
        &f,
        &tcp,
        &[
            "read -P 0x11 0 1M",
            "read -P 0 1M 512k",
            "read -P 0x22 1536k 512k",
            "read -P 0x33 4092k 8k",
            "read -P 0x55 12M 4k",
            "read -P 0x44 31M 1M",
            "read -P 0 2M 2044k",
            "write -P 0x66 100 1000",
            "read -P 0x66 100 1000",
            "read -P 0x11 0 100",
            "read -P 0x11 1100 1000",
            "discard 16M 4M",
            "aio_write -z -u 24M 4M",
            "aio_flush",
            "read -P 0 24M 4M",
        ],
    );
    qemu_io(&f, &unix, &["read -P 0x66 100 1000", "read -P 0 24M 4M"]);
}

#[test]
fn nbdinfo_map_shows_data_and_holes_after_trim() {
    let f = Fabric::start("4G");
    f.create_volume("thin", "64M");
    let url = f.unix_url("thin");
    let info = run(Command::new("nbdinfo").arg(&url));
    assert!(info.contains("base:allocation"), "{info}");
    assert!(info.contains("can_trim: true"), "{info}");

    let m = map(&url);
    assert_eq!(
        map_type(&m, 0, 64 * MIB) & 1,
        1,
        "a new volume is all holes: {m:?}"
    );

    qemu_io(&f, &url, &["write -P 0x5a 0 16M", "flush"]);
    let m = map(&url);
    assert_eq!(map_type(&m, 0, 16 * MIB), 0, "written data is data: {m:?}");
    assert_eq!(
        map_type(&m, 16 * MIB, 48 * MIB) & 1,
        1,
        "the rest is a hole: {m:?}"
    );

    // TRIM whole chunks in the middle: they become holes that read as zeros.
    qemu_io(&f, &f.tcp_url("thin"), &["discard 4M 8M", "flush"]);
    let m = map(&url);
    let t = map_type(&m, 4 * MIB, 8 * MIB);
    assert_eq!(t & 1, 1, "trimmed range is a hole: {m:?}");
    assert_eq!(map_type(&m, 0, 4 * MIB), 0, "{m:?}");
    assert_eq!(map_type(&m, 12 * MIB, 4 * MIB), 0, "{m:?}");
    if t & 2 == 2 {
        qemu_io(&f, &url, &["read -P 0 4M 8M"]);
    }
    qemu_io(&f, &url, &["read -P 0x5a 0 4M", "read -P 0x5a 12M 4M"]);

    let totals = run(Command::new("nbdinfo").args(["--map", "--totals", &url]));
    assert!(
        totals.contains("data") && totals.contains("hole"),
        "{totals}"
    );
}

#[test]
fn nbdcopy_round_trip_with_four_connections() {
    require("nbdcopy");
    let f = Fabric::start("4G");
    f.create_volume("copy", "48M");
    let url = f.unix_url("copy");
    let info: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", &url]))).unwrap();
    assert_eq!(
        info["exports"][0]["can_multi_conn"], true,
        "multi-conn advertised: {info}"
    );

    let src = f.path().join("src.raw");
    random_file(&src, 7, (48 * MIB) as usize);
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16", "--flush"])
        .arg(&src)
        .arg(&url));
    let out = f.path().join("out.raw");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16", &f.tcp_url("copy")])
        .arg(&out));
    assert_same_file(&src, &out);

    // And back in again from a different source over TCP, out over the socket.
    let src2 = f.path().join("src2.raw");
    std::fs::write(&src2, random_bytes(8, (48 * MIB) as usize)).unwrap();
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src2)
        .arg(f.tcp_url("copy")));
    run(Command::new("nbdcopy")
        .args(["--connections=4", &url])
        .arg(&out));
    assert_same_file(&src2, &out);
}

#[test]
fn fio_nbd_engine_random_writes_verify() {
    require("fio");
    let f = Fabric::start("4G");
    f.create_volume("fio", "64M");
    for url in [f.unix_url("fio"), f.tcp_url("fio")] {
        let out = run(Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={url}"),
                "--rw=randwrite",
                "--bs=4k",
                "--bsrange=4k-64k",
                "--size=32M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=terse",
            ])
            .current_dir(f.path()));
        assert!(!out.contains("verify: bad"), "{out}");
    }
}

#[test]
fn fabctl_volume_create_ls_show_rm_round_trip() {
    let f = Fabric::start("4G");
    f.fabctl_ok(&["volume", "create", "alpha", "--size", "128M"]);
    f.fabctl_ok(&["volume", "create", "beta", "--size", "1G"]);

    let table = f.fabctl_ok(&["volume", "ls"]);
    assert!(
        table.contains("alpha") && table.contains("beta") && table.contains("NAME"),
        "{table}"
    );
    let ls = f.json(&["volume", "ls"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"alpha") && names.contains(&"beta"), "{ls}");
    let show = f.json(&["volume", "show", "alpha"]);
    assert_eq!(show["name"], "alpha", "{show}");
    assert_eq!(show["size"], 128 * MIB, "{show}");
    assert!(f.fabctl_ok(&["volume", "show", "beta"]).contains("beta"));

    // Failures: non-zero exit and a one-line `fabctl: reason`.
    for args in [
        &["volume", "create", "alpha", "--size", "128M"][..],
        &["volume", "show", "nope"][..],
        &["volume", "rm", "nope"][..],
        &["volume", "create", "odd", "--size", "1000"][..],
        &["volume", "create", "bad", "--size", "lots"][..],
    ] {
        let (ok, out) = f.fabctl(args);
        assert!(!ok, "fabctl {args:?} should fail: {out}");
        let line = out.trim();
        assert!(
            line.starts_with("fabctl:") && !line.contains('\n'),
            "fabctl {args:?}: want one line `fabctl: reason`, got {out:?}"
        );
    }

    f.fabctl_ok(&["volume", "rm", "alpha"]);
    let ls = f.json(&["volume", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["name"], "beta", "{ls}");
    let (ok, _) = f.fabctl(&["volume", "show", "alpha"]);
    assert!(!ok);
    f.fabctl_ok(&["volume", "rm", "beta"]);
    assert_eq!(f.json(&["volume", "ls"]), serde_json::json!([]));
}

#[test]
fn volume_rm_removes_the_export_and_its_data() {
    let f = Fabric::start("4G");
    f.create_volume("gone", "32M");
    let url = f.unix_url("gone");
    qemu_io(&f, &url, &["write -P 0x77 0 8M", "flush"]);
    let list = run(Command::new("nbdinfo").args(["--list", &url]));
    assert!(list.contains("export=\"gone\""), "{list}");

    f.fabctl_ok(&["volume", "rm", "gone"]);
    wait_for("export gone to disappear", Duration::from_secs(20), || {
        !try_run(Command::new("nbdinfo").args(["--size", &url])).0
    });
    for u in [&url, &f.tcp_url("gone")] {
        let (ok, out) = try_run(Command::new("nbdinfo").arg(u));
        assert!(!ok, "nbdinfo {u} still works after volume rm: {out}");
    }
    let list = run(Command::new("nbdinfo").args(["--list", &url]));
    assert!(!list.contains("export=\"gone\""), "{list}");

    // The same name again is a new, empty volume.
    f.create_volume("gone", "32M");
    qemu_io(&f, &url, &["read -P 0 0 8M"]);
}
